//! `make bench`: per-circuit figures and a whole-batch run, measured in one process.

use std::path::Path;

pub fn run(_setup_dir: &Path, _samples: &Path, _geometry: proofmesh_core::Geometry) -> anyhow::Result<()> {
    anyhow::bail!("bench: not yet")
}
