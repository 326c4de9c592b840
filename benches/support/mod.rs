//! Helpers of the `compare` bench: the programs it runs (Garage and entrepot clusters among
//! them), the counting relay in front of the upstream and the bucket, the load it sends, the
//! seed content, and the report it prints.

pub mod cluster;
pub mod garage;
pub mod load;
pub mod procs;
pub mod relay;
pub mod report;
pub mod seed;
