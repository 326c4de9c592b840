//! The commands beside the server, each working on a store: `prefetch` (fills it through a
//! server's fill path), `export`/`import` (carry images across an air gap as OCI-layout tar
//! bundles) and `cache ls|rm|verify|gc` (maintenance on the store folder).

pub mod bundle;
pub mod maintenance;
pub mod prefetch;
