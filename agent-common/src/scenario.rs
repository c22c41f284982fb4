//! The business-scenario vocabulary of T/CQJR 032.2 table 1, owned here and
//! nowhere else: slot numbers (shared by the eBPF maps, the marker library's
//! codes and its C header), English and Chinese names, the standard weights
//! alpha_i (24/7/3/1), and the name of the line for what no scenario claimed.
//!
//! Everything is `#[inline]` so the eBPF object, which links this crate,
//! never carries the float constants or string tables.

/// Scenario slot of time or transactions that no marker claimed.
pub const SCENARIO_NONE: u32 = 0;
/// 授信: credit granting.
pub const SCENARIO_CREDIT: u32 = 1;
/// 支用: drawdown.
pub const SCENARIO_DRAWDOWN: u32 = 2;
/// 还款: repayment.
pub const SCENARIO_REPAYMENT: u32 = 3;
/// 查询: query.
pub const SCENARIO_QUERY: u32 = 4;
/// Number of scenario slots (including `SCENARIO_NONE`).
pub const SCENARIO_SLOTS: u32 = 5;

/// Name of the line that collects what no scenario claimed.
pub const UNASSIGNED: &str = "unassigned";

/// The English codes in the standard's order.
pub const SCENARIO_NAMES: [&str; 4] = [
    Scenario::Credit.name(),
    Scenario::Drawdown.name(),
    Scenario::Repayment.name(),
    Scenario::Query.name(),
];

/// The four scenarios of T/CQJR 032.2 table 1; the discriminant is the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Scenario {
    /// 授信: application, identity and credit-bureau check, risk pricing, approval.
    Credit = SCENARIO_CREDIT,
    /// 支用: limit confirmation, drawdown request, fund routing and payout.
    Drawdown = SCENARIO_DRAWDOWN,
    /// 还款: schedule, reminder, auto-debit, overdue handling.
    Repayment = SCENARIO_REPAYMENT,
    /// 查询: authenticated account lookup (the unit of business, alpha = 1).
    Query = SCENARIO_QUERY,
}

/// A name that is none of the scenarios (English or Chinese); it keeps the
/// first 32 bytes of the name to quote it (no allocation: this crate is no_std).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownScenario {
    text: [u8; 32],
    len: usize,
}

impl UnknownScenario {
    pub fn new(name: &str) -> Self {
        let mut len = name.len().min(32);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        let mut text = [0u8; 32];
        text[..len].copy_from_slice(&name.as_bytes()[..len]);
        UnknownScenario { text, len }
    }

    /// The refused name (cut at 32 bytes).
    pub fn name(&self) -> &str {
        core::str::from_utf8(&self.text[..self.len]).unwrap_or_default()
    }
}

impl core::fmt::Display for UnknownScenario {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "unknown scenario {:?}: expected one of credit, drawdown, repayment, query",
            self.name()
        )
    }
}

impl Scenario {
    /// In the standard's order (also slot order).
    pub const ALL: [Scenario; 4] = [
        Scenario::Credit,
        Scenario::Drawdown,
        Scenario::Repayment,
        Scenario::Query,
    ];

    /// Slot number shared with the eBPF side; the marker library's code.
    #[inline]
    pub const fn slot(self) -> u32 {
        self as u32
    }

    /// The marker library's name for [`Scenario::slot`].
    #[inline]
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Position in [`Scenario::ALL`], for per-scenario arrays.
    #[inline]
    pub const fn index(self) -> usize {
        self as usize - 1
    }

    /// The English code used in documents, configs and metrics.
    #[inline]
    pub const fn name(self) -> &'static str {
        match self {
            Scenario::Credit => "credit",
            Scenario::Drawdown => "drawdown",
            Scenario::Repayment => "repayment",
            Scenario::Query => "query",
        }
    }

    /// The standard's Chinese name.
    #[inline]
    pub const fn name_zh(self) -> &'static str {
        match self {
            Scenario::Credit => "授信",
            Scenario::Drawdown => "支用",
            Scenario::Repayment => "还款",
            Scenario::Query => "查询",
        }
    }

    /// alpha_i of the standard (formula (2)): 24, 7, 3, 1.
    #[inline]
    pub fn standard_weight(self) -> f64 {
        f64::from(self.standard_weight_units())
    }

    /// [`Scenario::standard_weight`] as the integer the standard writes.
    #[inline]
    pub const fn standard_weight_units(self) -> u32 {
        match self {
            Scenario::Credit => 24,
            Scenario::Drawdown => 7,
            Scenario::Repayment => 3,
            Scenario::Query => 1,
        }
    }

    /// The scenario of a slot; None for `SCENARIO_NONE` and out-of-range slots.
    #[inline]
    pub fn from_slot(slot: u32) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.slot() == slot)
    }

    /// The scenario of an English code only (documents and the wire use these).
    #[inline]
    pub fn from_code_name(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The scenario named by its English code or its Chinese name.
    #[inline]
    pub fn from_name(name: &str) -> Option<Scenario> {
        Scenario::ALL
            .into_iter()
            .find(|s| s.name() == name || s.name_zh() == name)
    }
}

impl core::fmt::Display for Scenario {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for Scenario {
    type Err = UnknownScenario;

    /// Accepts the English codes and the standard's Chinese names.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Scenario::from_name(text).ok_or_else(|| UnknownScenario::new(text))
    }
}

/// A value per scenario (transactions, weights, ...), indexed by [`Scenario::index`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerScenario<T>(pub [T; 4]);

impl<T: Copy> PerScenario<T> {
    #[inline]
    pub fn get(&self, scenario: Scenario) -> T {
        self.0[scenario.index()]
    }

    #[inline]
    pub fn set(&mut self, scenario: Scenario, value: T) {
        self.0[scenario.index()] = value;
    }
}

/// Completed transactions per scenario (markers, the ingest endpoint,
/// Prometheus scrapes).
pub type TransactionCounts = PerScenario<u64>;

impl PerScenario<u64> {
    /// Adds `count` to one scenario (saturating).
    #[inline]
    pub fn add(&mut self, scenario: Scenario, count: u64) {
        let slot = &mut self.0[scenario.index()];
        *slot = slot.saturating_add(count);
    }

    #[inline]
    pub fn merge(&mut self, other: &PerScenario<u64>) {
        for s in Scenario::ALL {
            self.add(s, other.get(s));
        }
    }

    #[inline]
    pub fn total(&self) -> u64 {
        self.0.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }
}

#[cfg(feature = "serde")]
mod serde_impl {
    use super::Scenario;

    impl serde::Serialize for Scenario {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(self.name())
        }
    }

    struct NameVisitor;

    impl serde::de::Visitor<'_> for NameVisitor {
        type Value = Scenario;

        fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.write_str(
                "a scenario name (credit, drawdown, repayment, query, or 授信, 支用, 还款, 查询)",
            )
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Scenario, E> {
            Scenario::from_name(text).ok_or_else(|| E::custom(super::UnknownScenario::new(text)))
        }
    }

    impl<'de> serde::Deserialize<'de> for Scenario {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_str(NameVisitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_names_and_weights_are_the_standards() {
        let table: [(Scenario, u32, &str, &str, f64); 4] = [
            (Scenario::Credit, 1, "credit", "授信", 24.0),
            (Scenario::Drawdown, 2, "drawdown", "支用", 7.0),
            (Scenario::Repayment, 3, "repayment", "还款", 3.0),
            (Scenario::Query, 4, "query", "查询", 1.0),
        ];
        for (i, (s, slot, en, zh, weight)) in table.into_iter().enumerate() {
            assert_eq!(Scenario::ALL[i], s);
            assert_eq!(s.slot(), slot);
            assert_eq!(s.index(), i);
            assert_eq!(s.name(), en);
            assert_eq!(s.name_zh(), zh);
            assert_eq!(s.standard_weight(), weight);
            assert_eq!(Scenario::from_slot(slot), Some(s));
            assert_eq!(Scenario::from_name(en), Some(s));
            assert_eq!(Scenario::from_name(zh), Some(s));
        }
        assert_eq!(Scenario::from_slot(SCENARIO_NONE), None);
        assert_eq!(Scenario::from_slot(SCENARIO_SLOTS), None);
        assert_eq!(Scenario::from_name(UNASSIGNED), None);
        assert_eq!(Scenario::from_name("Credit"), None);
        let refused = "Credit".parse::<Scenario>().unwrap_err();
        assert_eq!(refused.name(), "Credit");
        let long = "授信".repeat(20);
        assert!(long.starts_with(long.parse::<Scenario>().unwrap_err().name()));
    }
}
