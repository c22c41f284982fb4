pub mod attribution;
pub mod carbon;
pub mod profile_energy;
pub mod scenario;
