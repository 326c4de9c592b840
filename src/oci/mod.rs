//! The OCI distribution protocol, without I/O: names, references, digests, request paths,
//! media types and byte ranges. Everything here is pure and unit-tested beside the code.

pub mod digest;
pub mod media;
pub mod name;
pub mod range;
pub mod route;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use name::{NameError, Reference, RepoName, Tag};
pub use route::{Kind, Route, RouteError};
