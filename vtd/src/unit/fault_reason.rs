//! The closed set of fault reasons the unit can record (VT-d 7.1.3, the fault reason
//! tables; Linux `dma_remap_fault_reasons`). The discriminant is the spec's FR code.

/// A fault reason with its spec code as the value.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum FaultReason {
    /// 0x01: root entry P clear (not qualified).
    RootEntryNotPresent = 0x01,
    /// 0x02: context entry P clear (qualified).
    ContextEntryNotPresent = 0x02,
    /// 0x03: invalid context-entry programming, e.g. an unsupported AW or TT=11b.
    ContextEntryInvalid = 0x03,
    /// 0x04: input address beyond the domain's adjusted guest address width.
    AddressBeyondWidth = 0x04,
    /// 0x05: write through an entry without W.
    NoWrite = 0x05,
    /// 0x06: read through an entry without R.
    NoRead = 0x06,
    /// 0x07: a paging-structure entry could not be read (points outside memory).
    PagingEntryAccess = 0x07,
    /// 0x08: the root table address is invalid (outside memory).
    RootTableInvalid = 0x08,
    /// 0x09: the context table pointer is invalid (outside memory).
    ContextTableInvalid = 0x09,
    /// 0x0A: reserved bits set in a root entry.
    RootEntryReserved = 0x0a,
    /// 0x0B: reserved bits set in a context entry.
    ContextEntryReserved = 0x0b,
    /// 0x0C: reserved bits set in a paging-structure entry.
    PagingEntryReserved = 0x0c,
    /// 0x0D: the context's translation type blocks a translation or translated request.
    TranslationTypeBlocked = 0x0d,
    /// 0x0E: the output address lies in the interrupt range.
    InterruptAddress = 0x0e,
    /// 0x20: reserved fields set in a remappable interrupt request.
    IrRequestReserved = 0x20,
    /// 0x21: the interrupt index exceeds the interrupt remapping table.
    IrIndexOverflow = 0x21,
    /// 0x22: IRTE P clear.
    IrEntryNotPresent = 0x22,
    /// 0x23: the interrupt remapping table could not be read.
    IrTableAccess = 0x23,
    /// 0x24: reserved bits set in an IRTE.
    IrEntryReserved = 0x24,
    /// 0x25: a compatibility-format interrupt was blocked.
    IrCompatBlocked = 0x25,
    /// 0x26: source-id verification failed.
    IrSourceId = 0x26,
}

impl FaultReason {
    /// Every reason the unit can raise, for tests and metric descriptions.
    pub const ALL: [FaultReason; 21] = [
        Self::RootEntryNotPresent,
        Self::ContextEntryNotPresent,
        Self::ContextEntryInvalid,
        Self::AddressBeyondWidth,
        Self::NoWrite,
        Self::NoRead,
        Self::PagingEntryAccess,
        Self::RootTableInvalid,
        Self::ContextTableInvalid,
        Self::RootEntryReserved,
        Self::ContextEntryReserved,
        Self::PagingEntryReserved,
        Self::TranslationTypeBlocked,
        Self::InterruptAddress,
        Self::IrRequestReserved,
        Self::IrIndexOverflow,
        Self::IrEntryNotPresent,
        Self::IrTableAccess,
        Self::IrEntryReserved,
        Self::IrCompatBlocked,
        Self::IrSourceId,
    ];

    /// The FR code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Decodes an FR code.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

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

    /// Short, stable, lowercase name (metric label values, logs).
    pub const fn name(self) -> &'static str {
        match self {
            Self::RootEntryNotPresent => "root_entry_not_present",
            Self::ContextEntryNotPresent => "context_entry_not_present",
            Self::ContextEntryInvalid => "context_entry_invalid",
            Self::AddressBeyondWidth => "address_beyond_width",
            Self::NoWrite => "no_write",
            Self::NoRead => "no_read",
            Self::PagingEntryAccess => "paging_entry_access",
            Self::RootTableInvalid => "root_table_invalid",
            Self::ContextTableInvalid => "context_table_invalid",
            Self::RootEntryReserved => "root_entry_reserved",
            Self::ContextEntryReserved => "context_entry_reserved",
            Self::PagingEntryReserved => "paging_entry_reserved",
            Self::TranslationTypeBlocked => "translation_type_blocked",
            Self::InterruptAddress => "interrupt_address",
            Self::IrRequestReserved => "ir_request_reserved",
            Self::IrIndexOverflow => "ir_index_overflow",
            Self::IrEntryNotPresent => "ir_entry_not_present",
            Self::IrTableAccess => "ir_table_access",
            Self::IrEntryReserved => "ir_entry_reserved",
            Self::IrCompatBlocked => "ir_compat_blocked",
            Self::IrSourceId => "ir_source_id",
        }
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
