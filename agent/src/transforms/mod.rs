pub mod attribution;
pub mod carbon;
pub mod request_cpu;
pub mod scenario;
