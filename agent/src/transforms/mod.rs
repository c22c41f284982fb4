pub mod attribution;
pub mod carbon;
pub mod scenario;
