pub mod attribution;
pub mod carbon;
pub mod profile_energy;
pub mod request_cpu;
pub mod scenario;
