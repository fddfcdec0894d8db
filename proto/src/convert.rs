//! Conversions between the wire messages and `proofmesh-core`'s types.

use proofmesh_core::{Geometry, GeometryError, ProtocolVersion};

use crate::v1;

impl From<ProtocolVersion> for v1::ProtocolVersion {
    fn from(v: ProtocolVersion) -> Self {
        v1::ProtocolVersion { minor: v.minor.into(), patch: v.patch.into() }
    }
}

impl v1::ProtocolVersion {
    /// The domain type; `None` if a field does not fit 16 bits.
    pub fn to_core(&self) -> Option<ProtocolVersion> {
        Some(ProtocolVersion { minor: self.minor.try_into().ok()?, patch: self.patch.try_into().ok()? })
    }
}

impl From<Geometry> for v1::Geometry {
    fn from(g: Geometry) -> Self {
        v1::Geometry {
            state_tree_depth: g.state_tree_depth.into(),
            tx_chunk: g.tx_chunk.into(),
            vm_chunk: g.vm_chunk.into(),
            storage_chunk: g.storage_chunk.into(),
            leaf_fan_in: g.leaf_fan_in.into(),
            node_fan_in: g.node_fan_in.into(),
            max_node_depth: g.max_node_depth.into(),
        }
    }
}

impl v1::Geometry {
    /// The domain type, validated. Errors: a field out of range (see `Geometry::validate`).
    pub fn to_core(&self) -> Result<Geometry, GeometryError> {
        let out = |field: &'static str, value: u32, max: u64| GeometryError::OutOfRange { field, value: value.into(), min: 0, max };
        let small = |v: u32, field| u8::try_from(v).map_err(|_| out(field, v, u8::MAX.into()));
        let chunk = |v: u32, field| u16::try_from(v).map_err(|_| out(field, v, u16::MAX.into()));
        let g = Geometry {
            state_tree_depth: small(self.state_tree_depth, "state_tree_depth")?,
            tx_chunk: chunk(self.tx_chunk, "tx_chunk")?,
            vm_chunk: chunk(self.vm_chunk, "vm_chunk")?,
            storage_chunk: chunk(self.storage_chunk, "storage_chunk")?,
            leaf_fan_in: small(self.leaf_fan_in, "leaf_fan_in")?,
            node_fan_in: small(self.node_fan_in, "node_fan_in")?,
            max_node_depth: small(self.max_node_depth, "max_node_depth")?,
        };
        g.validate()?;
        Ok(g)
    }
}
