//! Kubernetes resource quantities (`500m`, `1.5Gi`, `2e3`) parsed into exact integers, so that
//! limits and requests can be compared before a pod that would never start is created.

use std::cmp::Ordering;
use std::fmt;

/// A non-negative quantity in billionths of its unit (nano-cores, nano-bytes), exact for every
/// suffix Kubernetes accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ParsedQuantity(u128);

/// The text is not a quantity Kubernetes would accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid quantity (e.g. 500m, 2, 768Mi, 1Gi)")]
pub struct InvalidQuantity(pub String);

const NANO: u128 = 1_000_000_000;

impl ParsedQuantity {
    /// Parses a quantity; negative values are refused because no resource can be negative.
    pub fn parse(text: &str) -> Result<Self, InvalidQuantity> {
        let invalid = || InvalidQuantity(text.to_owned());
        let trimmed = text.trim();
        let number_end = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
            .unwrap_or(trimmed.len());
        let (number, suffix) = trimmed.split_at(number_end);
        let number = number.strip_prefix('+').unwrap_or(number);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty()
            || !whole.chars().all(|c| c.is_ascii_digit())
            || !fraction.chars().all(|c| c.is_ascii_digit())
            || whole.len() + fraction.len() > 30
        {
            return Err(invalid());
        }
        // The mantissa as an integer with `fraction.len()` decimal places.
        let digits: u128 = format!("{whole}{fraction}")
            .parse()
            .map_err(|_| invalid())?;
        let places = u32::try_from(fraction.len()).map_err(|_| invalid())?;

        let (multiplier, exponent): (u128, i32) = match suffix {
            "" => (1, 0),
            "n" => (1, -9),
            "u" => (1, -6),
            "m" => (1, -3),
            "k" => (1, 3),
            "M" => (1, 6),
            "G" => (1, 9),
            "T" => (1, 12),
            "P" => (1, 15),
            "E" => (1, 18),
            "Ki" => (1 << 10, 0),
            "Mi" => (1 << 20, 0),
            "Gi" => (1 << 30, 0),
            "Ti" => (1 << 40, 0),
            "Pi" => (1 << 50, 0),
            "Ei" => (1 << 60, 0),
            exp => {
                let exponent = exp
                    .strip_prefix(['e', 'E'])
                    .and_then(|e| e.parse::<i32>().ok())
                    .filter(|e| (-9..=18).contains(e))
                    .ok_or_else(invalid)?;
                (1, exponent)
            }
        };
        // value = digits * multiplier * 10^exponent / 10^places, in units of 10^-9.
        let scale = exponent + 9 - i32::try_from(places).map_err(|_| invalid())?;
        let scaled = digits.checked_mul(multiplier).ok_or_else(invalid)?;
        let value = if scale >= 0 {
            10_u128
                .checked_pow(scale.unsigned_abs())
                .and_then(|p| scaled.checked_mul(p))
                .ok_or_else(invalid)?
        } else {
            // Finer than a billionth: Kubernetes rounds up, and so does this.
            let divisor = 10_u128
                .checked_pow(scale.unsigned_abs())
                .ok_or_else(invalid)?;
            scaled.div_ceil(divisor)
        };
        Ok(Self(value))
    }

    /// The quantity in whole units, rounded down (bytes for memory, cores for CPU).
    pub fn whole_units(self) -> u128 {
        self.0 / NANO
    }
}

impl fmt::Display for ParsedQuantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}n", self.0)
    }
}

/// Compares two quantities given as text.
pub fn compare(a: &str, b: &str) -> Result<Ordering, InvalidQuantity> {
    Ok(ParsedQuantity::parse(a)?.cmp(&ParsedQuantity::parse(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str) -> ParsedQuantity {
        ParsedQuantity::parse(text).unwrap()
    }

    #[test]
    fn binary_and_decimal_suffixes_scale_exactly() {
        assert_eq!(q("1Ki").whole_units(), 1024);
        assert_eq!(q("768Mi").whole_units(), 768 * 1024 * 1024);
        assert_eq!(q("1.5Gi").whole_units(), 3 * 512 * 1024 * 1024);
        assert_eq!(q("2k").whole_units(), 2000);
        assert_eq!(q("1e3").whole_units(), 1000);
        assert_eq!(q("500m"), q("0.5"));
        assert_eq!(q("1"), q("1000m"));
    }

    #[test]
    fn fractions_finer_than_a_nanounit_round_up() {
        assert_eq!(q("1n"), q("0.1n"));
    }

    #[test]
    fn cpu_and_memory_compare_across_notations() {
        assert!(q("1536Mi") > q("1Gi"));
        assert!(q("250m") < q("1"));
        assert_eq!(compare("1Gi", "1024Mi").unwrap(), Ordering::Equal);
    }

    #[test]
    fn malformed_and_negative_quantities_are_refused() {
        for bad in ["", "abc", "1.2.3", "-1", "1Xi", "1e99", "Mi", ".", "1 Gi"] {
            assert!(ParsedQuantity::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
