//! The commands beside the server, each working on a store: `prefetch` (fills it through a
//! server's fill path), `export`/`import` (carry images across an air gap as OCI-layout tar
//! bundles) and `cache ls|rm|verify|gc` (maintenance); all of them through `Store`.

pub mod blocking;
pub mod bundle;
pub mod maintenance;
pub mod prefetch;
