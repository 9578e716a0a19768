//! PingMesh operator: hosts the mesh controller.
pub mod mesh;
