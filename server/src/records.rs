//! Stored records (CBOR), one type per column family value: defined by the protocol core.

pub use missive_core::records::*;
