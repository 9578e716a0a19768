//! Shared by the fuzz targets and the seed generator: how a gRPC fuzz input
//! is laid out, so seeds and target agree.

pub mod grpc_input;
