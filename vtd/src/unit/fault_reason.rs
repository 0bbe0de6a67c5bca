//! The closed set of fault reasons the unit can record (VT-d 7.1.3, the fault reason
//! tables; Linux `dma_remap_fault_reasons`). The discriminant is the spec's FR code; each
//! reason's name is beside it.

use super::field::field_enum;

field_enum! {
    /// A fault reason with its spec code as the value.
    pub enum FaultReason(u8; code, from_code) {
        /// 0x01: root entry P clear (not qualified).
        RootEntryNotPresent = 0x01 => "root_entry_not_present",
        /// 0x02: context entry P clear (qualified).
        ContextEntryNotPresent = 0x02 => "context_entry_not_present",
        /// 0x03: invalid context-entry programming, e.g. an unsupported AW or TT=11b.
        ContextEntryInvalid = 0x03 => "context_entry_invalid",
        /// 0x04: input address beyond the domain's adjusted guest address width.
        AddressBeyondWidth = 0x04 => "address_beyond_width",
        /// 0x05: write through an entry without W.
        NoWrite = 0x05 => "no_write",
        /// 0x06: read through an entry without R.
        NoRead = 0x06 => "no_read",
        /// 0x07: a paging-structure entry could not be read (points outside memory).
        PagingEntryAccess = 0x07 => "paging_entry_access",
        /// 0x08: the root table address is invalid (outside memory).
        RootTableInvalid = 0x08 => "root_table_invalid",
        /// 0x09: the context table pointer is invalid (outside memory).
        ContextTableInvalid = 0x09 => "context_table_invalid",
        /// 0x0A: reserved bits set in a root entry.
        RootEntryReserved = 0x0a => "root_entry_reserved",
        /// 0x0B: reserved bits set in a context entry.
        ContextEntryReserved = 0x0b => "context_entry_reserved",
        /// 0x0C: reserved bits set in a paging-structure entry.
        PagingEntryReserved = 0x0c => "paging_entry_reserved",
        /// 0x0D: the context's translation type blocks a translation or translated request.
        TranslationTypeBlocked = 0x0d => "translation_type_blocked",
        /// 0x0E: the output address lies in the interrupt range.
        InterruptAddress = 0x0e => "interrupt_address",
        /// 0x20: reserved fields set in a remappable interrupt request.
        IrRequestReserved = 0x20 => "ir_request_reserved",
        /// 0x21: the interrupt index exceeds the interrupt remapping table.
        IrIndexOverflow = 0x21 => "ir_index_overflow",
        /// 0x22: IRTE P clear.
        IrEntryNotPresent = 0x22 => "ir_entry_not_present",
        /// 0x23: the interrupt remapping table could not be read.
        IrTableAccess = 0x23 => "ir_table_access",
        /// 0x24: reserved bits set in an IRTE.
        IrEntryReserved = 0x24 => "ir_entry_reserved",
        /// 0x25: a compatibility-format interrupt was blocked.
        IrCompatBlocked = 0x25 => "ir_compat_blocked",
        /// 0x26: source-id verification failed.
        IrSourceId = 0x26 => "ir_source_id",
    }
}

impl FaultReason {
    /// Qualified faults are not recorded when the context entry has FPD set (VT-d 7.1.2;
    /// QEMU `vtd_qualified_faults[]`). Faults raised before a context entry is found
    /// (root table, root entry, context table) are never qualified.
    pub const fn qualified(self) -> bool {
        matches!(
            self,
            Self::ContextEntryNotPresent
                | Self::ContextEntryInvalid
                | Self::AddressBeyondWidth
                | Self::NoWrite
                | Self::NoRead
                | Self::PagingEntryAccess
                | Self::PagingEntryReserved
                | Self::TranslationTypeBlocked
                | Self::InterruptAddress
                | Self::IrEntryNotPresent
                | Self::IrEntryReserved
                | Self::IrSourceId
        )
    }
}

impl std::fmt::Display for FaultReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:#04x})", self.name(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for r in FaultReason::ALL {
            assert_eq!(FaultReason::from_code(r.code()), Some(r));
        }
        assert_eq!(FaultReason::from_code(0x00), None);
        assert_eq!(FaultReason::NoWrite.code(), 0x05);
        assert_eq!(FaultReason::IrSourceId.code(), 0x26);
    }
}
