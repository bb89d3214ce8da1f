//! Settings chosen by name (`--stage swarm`, `log_format = "json"`): one parser and one error
//! for every such enum, so each names its accepted values the same way.

/// A setting given a name outside those it accepts (a CLI flag or a config file value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {setting} '{value}' (one of: {})", .accepted.join(", "))]
pub struct UnknownName {
    /// What the setting is, e.g. "stage".
    pub setting: &'static str,
    /// The name given.
    pub value: String,
    /// The names accepted.
    pub accepted: &'static [&'static str],
}

/// Parses `s` as one of `names`, in the order of `values`.
pub fn parse<T: Copy>(
    setting: &'static str,
    names: &'static [&'static str],
    values: &[T],
    s: &str,
) -> Result<T, UnknownName> {
    names
        .iter()
        .position(|n| *n == s)
        .and_then(|i| values.get(i).copied())
        .ok_or_else(|| UnknownName {
            setting,
            value: s.to_string(),
            accepted: names,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_maps_to_its_value_and_an_unknown_one_lists_the_accepted() {
        const NAMES: [&str; 2] = ["a", "b"];
        assert_eq!(parse("letter", &NAMES, &[1, 2], "b"), Ok(2));
        let err = parse("letter", &NAMES, &[1, 2], "c").unwrap_err();
        assert_eq!(err.to_string(), "unknown letter 'c' (one of: a, b)");
    }
}
