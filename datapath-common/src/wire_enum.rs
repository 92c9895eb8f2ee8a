//! One table per enum that crosses the kernel/user boundary.

/// Define an enum that crosses the boundary from one table: per variant its
/// number (a counter slot or a value in a map: stable, append only), its
/// stable snake_case name (CLI, logs, metrics) and a one-line explanation
/// for an operator (also the variant's doc). From the table come the enum,
/// `ALL` (in table order), `COUNT`, `name()`, `explanation()` and
/// `from_u32()`, so none of them can miss a variant.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $Enum:ident {
            $(
                $(#[$variant_meta:meta])*
                $Variant:ident = $value:literal, $name:literal, $explanation:literal;
            )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $Enum {
            $(
                #[doc = $explanation]
                $(#[$variant_meta])*
                $Variant = $value,
            )+
        }

        impl $Enum {
            /// Every variant, in table order.
            pub const ALL: [$Enum; [$($value),+].len()] = [$($Enum::$Variant),+];
            /// The number of variants.
            pub const COUNT: u32 = $Enum::ALL.len() as u32;

            /// Stable snake_case name, used in CLI output, logs and metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $($Enum::$Variant => $name,)+
                }
            }

            /// One line for an operator: what it means and what to look at.
            pub const fn explanation(self) -> &'static str {
                match self {
                    $($Enum::$Variant => $explanation,)+
                }
            }

            /// The variant numbered `value`, if there is one.
            pub const fn from_u32(value: u32) -> Option<$Enum> {
                match value {
                    $($value => Some($Enum::$Variant),)+
                    _ => None,
                }
            }
        }
    };
}
