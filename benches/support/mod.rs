//! Helpers of the `compare` bench: the programs it runs (Garage and entrepot clusters among
//! them), the counting relay in front of the upstream and the bucket, the shaping relay of the
//! shaped link, the load it sends, the seed content, the report it prints, and issue 13's
//! scenarios (issue 13's scenarios themselves are in `compare/limits.rs`), and the floor a
//! cold pull's CPU is measured against (issue 13).

pub mod cluster;
pub mod floor;
pub mod garage;
pub mod load;
pub mod procs;
pub mod relay;
pub mod report;
pub mod seed;
pub mod shaped;
