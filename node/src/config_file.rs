//! The config file (`--config FILE`, or env `P2P_NODE_CONFIG`): TOML with a key for every
//! flag, so that a service needs no long command line.
//!
//! Precedence: command line > environment > config file > defaults. The file is applied by
//! turning its keys into the flags they stand for and parsing again, so a value from the file
//! is checked exactly like the same flag (and its errors name the file). Top-level keys are
//! the flags every subcommand takes (`data_dir = "/var/lib/p2p-node"`, `bootstrap = [...]`,
//! `no_mdns = true`); `[train]` and `[fetch]` hold those of the subcommand of that name and
//! apply only to it. Keys are the flag names with `_` or `-` (`api_addr`, `api-addr`). An
//! unknown key, or a list for a flag given once, is an error naming the key.
//! `p2p-node config --dump` prints the effective configuration in the same format (the
//! idea of Forest's `--config` and `config dump`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory};

use crate::cli::Cli;

/// The flag naming the file, and its environment variable.
pub const CONFIG_FLAG: &str = "config";

/// Most bytes of a config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Subcommands whose flags a `[section]` of the file may hold.
const SECTIONS: [&str; 2] = ["train", "fetch"];

/// What went wrong with a config file; its message is one line naming the file (and key).
#[derive(Debug, thiserror::Error)]
#[error("config file {path}: {message}")]
pub struct ConfigFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// The command line with the config file applied.
#[derive(Debug)]
pub struct Applied {
    /// The arguments, the file's flags added where the command line and the environment
    /// give none.
    pub args: Vec<OsString>,
    /// The file and its contents, when there is one.
    pub file: Option<(PathBuf, toml::Table)>,
}

/// `args` (the program name first) with the config file's values added as flags where the
/// command line and the environment give none; unchanged without a config file.
///
/// Every key is checked, also those of a section whose subcommand does not run: an unknown
/// key, a value of the wrong shape or a value its flag refuses is a [`ConfigFileError`].
/// Errors of `args` themselves are clap's (bad usage).
pub fn apply(args: Vec<OsString>) -> Result<Applied, Error> {
    let matches = match relaxed().try_get_matches_from(&args) {
        Ok(m) => m,
        // A required flag may come from the file: find --config anyway.
        Err(e) if e.kind() == ErrorKind::MissingRequiredArgument => {
            relaxed().ignore_errors(true).try_get_matches_from(&args)?
        }
        Err(e) => return Err(e.into()),
    };
    let Some(path) = matches.get_one::<PathBuf>(CONFIG_FLAG).cloned() else {
        return Ok(Applied { args, file: None });
    };
    let table = read(&path)?;
    let fail = |message: String| ConfigFileError {
        path: path.clone(),
        message,
    };
    let command = Cli::command();
    let active = matches.subcommand();
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        if let Some(section) = SECTIONS.iter().find(|s| **s == key) {
            let toml::Value::Table(section_table) = value else {
                return Err(
                    fail(format!("[{section}] must be a table of {section}'s flags")).into(),
                );
            };
            let sub = command
                .find_subcommand(section)
                .expect("sections are subcommands");
            let mut flags = Vec::new();
            for (key, value) in section_table {
                let arg = find_arg(sub, key, false)
                    .ok_or_else(|| fail(format!("unknown key '{key}' in [{section}]")))?;
                let these =
                    to_flags(arg, value).map_err(|m| fail(format!("{section}.{key}: {m}")))?;
                let given =
                    active.is_some_and(|(name, m)| name == *section && set_outside_file(m, arg));
                if !given {
                    flags.extend(these);
                }
            }
            check_values(section, &flags).map_err(|m| fail(format!("[{section}] {m}")))?;
            if active.is_some_and(|(name, _)| name == *section) {
                extra.extend(flags);
            }
            continue;
        }
        let arg =
            find_arg(&command, key, true).ok_or_else(|| fail(format!("unknown key '{key}'")))?;
        let flags = to_flags(arg, value).map_err(|m| fail(format!("{key}: {m}")))?;
        let sub_set = active.is_some_and(|(_, m)| set_outside_file(m, arg));
        if !set_outside_file(&matches, arg) && !sub_set {
            extra.extend(flags);
        }
    }
    // Flags go before a `--`, after which everything is a positional value.
    let mut args = args;
    let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
    args.splice(at..at, extra);
    Ok(Applied {
        args,
        file: Some((path, table)),
    })
}

/// The command with no argument required, to find `--config` (and to check a section's
/// values) before the file supplies what the command line lacks.
fn relaxed() -> clap::Command {
    let mut command = Cli::command();
    for name in SECTIONS {
        command = command.mut_subcommand(name, |sub| sub.mut_args(|a| a.required(false)));
    }
    command
}

/// Checks a section's flags the way its subcommand parses them (values, ranges, names);
/// arguments only the command line gives (a fetch's target) are not asked for.
fn check_values(section: &str, flags: &[OsString]) -> Result<(), String> {
    let mut args: Vec<OsString> = vec!["p2p-node".into(), section.into()];
    args.extend(flags.iter().cloned());
    match relaxed().try_get_matches_from(args) {
        Err(e) if e.kind() != ErrorKind::MissingRequiredArgument => Err(first_line(&e)),
        _ => Ok(()),
    }
}

/// Parses the command line with the config file applied (see [`apply`]); returns the
/// arguments, the matches they came from and the file (for [`dump`]).
pub fn parse(args: Vec<OsString>) -> Result<Parsed, Error> {
    use clap::FromArgMatches;
    let applied = apply(args.clone())?;
    let matches = match Cli::command().try_get_matches_from(&applied.args) {
        Ok(m) => m,
        Err(e) => {
            // The command line alone may be at fault: then it is a usage error.
            let alone = Cli::command().try_get_matches_from(&args);
            return Err(match (alone, &applied.file) {
                (Err(own), _) if own.kind() != ErrorKind::MissingRequiredArgument => own.into(),
                (_, Some((path, _))) => ConfigFileError {
                    path: path.clone(),
                    message: first_line(&e),
                }
                .into(),
                (_, None) => e.into(),
            });
        }
    };
    let cli = Cli::from_arg_matches(&matches)?;
    Ok(Parsed {
        cli,
        matches,
        file: applied.file,
    })
}

/// What [`parse`] gives.
#[derive(Debug)]
pub struct Parsed {
    /// The arguments.
    pub cli: Cli,
    /// The matches they came from.
    pub matches: ArgMatches,
    /// The config file and its contents, when there is one.
    pub file: Option<(PathBuf, toml::Table)>,
}

/// Either kind of failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line (or help / version asked for).
    #[error(transparent)]
    Usage(#[from] clap::Error),
    /// Bad config file.
    #[error(transparent)]
    File(#[from] ConfigFileError),
}

fn first_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    rendered
        .lines()
        .next()
        .unwrap_or("invalid value")
        .trim_start_matches("error: ")
        .to_string()
}

/// Reads and parses the file: a regular file of at most [`MAX_CONFIG_BYTES`]
/// ([`crate::fsutil::read_bounded`]).
fn read(path: &Path) -> Result<toml::Table, ConfigFileError> {
    let fail = |message: String| ConfigFileError {
        path: path.to_path_buf(),
        message,
    };
    let bytes = match crate::fsutil::read_bounded(path, MAX_CONFIG_BYTES) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Err(fail("cannot read it: no such file".to_string())),
        Err(e) => return Err(fail(format!("{e:#}"))),
    };
    let text = String::from_utf8(bytes).map_err(|_| fail("is not UTF-8 text".to_string()))?;
    text.parse::<toml::Table>()
        .map_err(|e| fail(e.to_string().replace('\n', " ").trim().to_string()))
}

/// The flag `key` stands for among `command`'s own (`global` ones at the top level, the
/// subcommand's others in a section). Help, version, `--config` and hidden flags are not
/// keys.
fn find_arg<'a>(command: &'a clap::Command, key: &str, global: bool) -> Option<&'a Arg> {
    let id = key.replace('-', "_");
    command.get_arguments().find(|a| {
        a.get_id().as_str() == id
            && a.get_long().is_some()
            && !a.is_positional()
            && !a.is_hide_set()
            && a.is_global_set() == global
            && a.get_id().as_str() != CONFIG_FLAG
            && !matches!(a.get_action(), ArgAction::Help | ArgAction::Version)
    })
}

/// Whether the command line or the environment gave `arg` (then the file does not).
fn set_outside_file(matches: &ArgMatches, arg: &Arg) -> bool {
    matches!(
        matches.value_source(arg.get_id().as_str()),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Whether `arg` is a switch (`--no-mdns`, `--no-mdns=false`).
fn is_switch(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
        || (arg.get_num_args().is_some_and(|n| n.min_values() == 0)
            && arg.get_default_values().iter().any(|v| v == "false"))
}

/// The command-line flags for `value` of `arg`.
fn to_flags(arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let long = arg.get_long().expect("keys are long flags");
    if is_switch(arg) {
        return match value {
            toml::Value::Boolean(true) => Ok(vec![format!("--{long}").into()]),
            // Off is the default: nothing to add.
            toml::Value::Boolean(false) => Ok(vec![]),
            _ => Err("must be true or false".into()),
        };
    }
    match (arg.get_action(), value) {
        (ArgAction::Append, toml::Value::Array(items)) => items
            .iter()
            .map(|item| scalar(item).map(|v| format!("--{long}={v}").into()))
            .collect(),
        (ArgAction::Append, item) => Ok(vec![format!("--{long}={}", scalar(item)?).into()]),
        (_, toml::Value::Array(_)) => Err("takes one value, not a list".into()),
        (_, item) => Ok(vec![format!("--{long}={}", scalar(item)?).into()]),
    }
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err("must be a string, a number or a boolean".into()),
    }
}

/// The effective configuration as a config file: every key with the value in force (command
/// line > environment > config file > default), unset ones commented out; `file` is the
/// config file in force (its sections give the subcommands' values). `resolved` overrides
/// the shown value of keys whose default is computed at run time (`data_dir`, `listen`).
pub fn dump(
    matches: &ArgMatches,
    file: Option<&toml::Table>,
    resolved: &[(&str, Vec<String>)],
) -> String {
    let command = Cli::command();
    let mut out = String::from(
        "# p2p-node configuration in force (command line > environment > config file > \
         defaults)\n",
    );
    let globals: Vec<&Arg> = command
        .get_arguments()
        .filter(|a| find_arg(&command, a.get_id().as_str(), true).is_some())
        .collect();
    for arg in globals {
        let id = arg.get_id().as_str();
        let values = resolved
            .iter()
            .find(|(k, _)| *k == id)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| raw_values(matches, id));
        out.push_str(&line(arg, &values));
    }
    for section in SECTIONS {
        let sub = command
            .find_subcommand(section)
            .expect("sections are subcommands");
        out.push_str(&format!("\n[{section}]\n"));
        let table = file
            .and_then(|t| t.get(section))
            .and_then(toml::Value::as_table);
        for arg in sub.get_arguments() {
            if find_arg(sub, arg.get_id().as_str(), false).is_none() {
                continue;
            }
            let values = table
                .and_then(|t| section_value(t, arg))
                .unwrap_or_else(|| {
                    arg.get_default_values()
                        .iter()
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect()
                });
            out.push_str(&line(arg, &values));
        }
    }
    out
}

/// A section's value for `arg`, if it sets it.
fn section_value(section: &toml::Table, arg: &Arg) -> Option<Vec<String>> {
    let value = section
        .iter()
        .find(|(k, _)| k.replace('-', "_") == arg.get_id().as_str())?
        .1;
    match value {
        toml::Value::Array(items) => items.iter().map(|i| scalar(i).ok()).collect(),
        v => scalar(v).ok().map(|s| vec![s]),
    }
}

fn raw_values(matches: &ArgMatches, id: &str) -> Vec<String> {
    matches
        .get_raw(id)
        .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// One `key = value` line.
fn line(arg: &Arg, values: &[String]) -> String {
    let id = arg.get_id().as_str();
    if is_switch(arg) {
        let on = values.first().is_some_and(|v| v == "true");
        return format!("{id} = {on}\n");
    }
    match arg.get_action() {
        ArgAction::Append => {
            let items: Vec<String> = values.iter().map(|v| toml_scalar(v)).collect();
            format!("{id} = [{}]\n", items.join(", "))
        }
        _ => match values.first() {
            Some(v) => format!("{id} = {}\n", toml_scalar(v)),
            None => format!("# {id} = (unset)\n"),
        },
    }
}

/// A value as TOML: a number where TOML writes that number back as the same text (so that
/// reading the dump gives the same flag value: `007`, `+7` and `1.50` stay strings), else a
/// string.
fn toml_scalar(v: &str) -> String {
    let as_integer = v.parse::<i64>().ok().filter(|i| i.to_string() == v);
    let as_float = v
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && v.contains('.') && f.to_string() == v);
    if as_integer.is_some() || as_float.is_some() {
        v.to_string()
    } else {
        toml::Value::String(v.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> String {
        let path = dir.path().join("p2p-node.toml");
        std::fs::write(&path, text).expect("write config");
        path.display().to_string()
    }

    fn cli(list: &[&str]) -> Result<Cli, Error> {
        parse(args(list)).map(|p| p.cli)
    }

    #[test]
    fn the_file_sets_flags_the_command_line_does_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = write(
            &dir,
            "data_dir = \"/from/file\"\nno_mdns = true\nmax-upload-rate = 2.5\n\
             bootstrap = [\"/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWHFrmLWTTDD4NodngtRMEVYgxrsDHNK2KjVgXM12L6eGt\"]\n\
             [train]\nkeep_checkpoints = 7\nexit_when_done = true\n",
        );
        let parsed = cli(&["p2p-node", "--config", &file, "train"]).expect("parses");
        assert_eq!(parsed.common.data_dir, Some(PathBuf::from("/from/file")));
        assert!(parsed.common.no_mdns);
        assert_eq!(parsed.common.max_upload_rate, Some(2.5));
        assert_eq!(parsed.common.bootstrap.len(), 1);
        let Some(crate::cli::Command::Train(train)) = parsed.command else {
            panic!("train");
        };
        assert_eq!(train.keep_checkpoints, 7);
        assert!(train.exit_when_done);
    }

    #[test]
    fn the_command_line_beats_the_file_and_lists_are_replaced_not_merged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = write(
            &dir,
            "data_dir = \"/from/file\"\nlisten = [\"/ip4/0.0.0.0/tcp/1\", \"/ip4/0.0.0.0/tcp/2\"]\n\
             [train]\nkeep_checkpoints = 7\n",
        );
        let parsed = cli(&[
            "p2p-node",
            "train",
            "--keep-checkpoints",
            "2",
            "--config",
            &file,
            "--data-dir",
            "/from/cli",
            "--listen",
            "/ip4/127.0.0.1/tcp/3",
        ])
        .expect("parses");
        assert_eq!(parsed.common.data_dir, Some(PathBuf::from("/from/cli")));
        assert_eq!(parsed.common.listen.len(), 1);
        let Some(crate::cli::Command::Train(train)) = parsed.command else {
            panic!("train");
        };
        assert_eq!(train.keep_checkpoints, 2);
    }

    #[test]
    fn a_section_applies_only_to_its_subcommand() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = write(&dir, "[fetch]\ntimeout = 5\n[train]\nfind_timeout = 9\n");
        let parsed = cli(&["p2p-node", "--config", &file, "id"]).expect("parses");
        assert!(matches!(parsed.command, Some(crate::cli::Command::Id)));
    }

    #[test]
    fn unknown_keys_and_wrong_shapes_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (text, expected) in [
            ("no_mdsn = true\n", "unknown key 'no_mdsn'"),
            ("[train]\nsteps = 3\n", "unknown key 'steps' in [train]"),
            ("no_mdns = \"yes\"\n", "no_mdns: must be true or false"),
            ("api_addr = [\"a\", \"b\"]\n", "api_addr: takes one value"),
            ("train = 3\n", "[train] must be a table"),
            (
                "poison_averaging = true\n",
                "unknown key 'poison_averaging'",
            ),
            ("config = \"/x\"\n", "unknown key 'config'"),
        ] {
            let file = write(&dir, text);
            let err = cli(&["p2p-node", "--config", &file, "id"]).expect_err(text);
            let message = err.to_string();
            assert!(
                message.contains(expected) && message.contains(&file),
                "{text:?}: {message}"
            );
        }
    }

    #[test]
    fn bad_values_and_bad_toml_name_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = write(&dir, "listen = [\"not-an-addr\"]\n");
        let message = cli(&["p2p-node", "--config", &file, "id"])
            .expect_err("bad multiaddr")
            .to_string();
        assert!(
            message.contains(&file) && message.contains("not-an-addr"),
            "{message}"
        );
        let file = write(&dir, "data_dir = \n");
        let message = cli(&["p2p-node", "--config", &file, "id"])
            .expect_err("bad TOML")
            .to_string();
        assert!(
            message.contains(&file) && !message.contains('\n'),
            "{message}"
        );
        let message = cli(&["p2p-node", "--config", "/no/such/file.toml", "id"])
            .expect_err("missing")
            .to_string();
        assert!(message.contains("/no/such/file.toml"), "{message}");
    }

    #[test]
    fn the_dump_reads_back_as_the_same_configuration() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = write(
            &dir,
            "no_mdns = true\nmax_upload_rate = 2.5\nstage = \"host-assisted\"\n\
             [fetch]\ntimeout = 60\n",
        );
        let parsed = parse(args(&["p2p-node", "--config", &file, "id"])).expect("parses");
        let table = parsed.file.as_ref().map(|(_, t)| t);
        let dumped = dump(&parsed.matches, table, &[("data_dir", vec!["/d".into()])]);
        assert!(dumped.contains("no_mdns = true\n"), "{dumped}");
        assert!(dumped.contains("max_upload_rate = 2.5\n"), "{dumped}");
        assert!(dumped.contains("stage = \"host-assisted\"\n"), "{dumped}");
        assert!(dumped.contains("data_dir = \"/d\"\n"), "{dumped}");
        let fetch = &dumped[dumped.find("[fetch]").expect("a [fetch] section")..];
        assert!(fetch.contains("\ntimeout = 60\n"), "{dumped}");
        assert!(dumped.contains("keep_checkpoints = 3\n"), "{dumped}");
        // The dump is itself a valid config file.
        let again = write(&dir, &dumped);
        let parsed = cli(&["p2p-node", "--config", &again, "fetch", "m", "--out", "/o"])
            .expect("the dump parses");
        assert!(parsed.common.no_mdns);
        assert_eq!(parsed.common.max_upload_rate, Some(2.5));
        let Some(crate::cli::Command::Fetch(fetch)) = parsed.command else {
            panic!("fetch");
        };
        assert_eq!(fetch.timeout, 60);
    }

    #[test]
    fn required_flags_may_come_from_the_file_and_a_double_dash_ends_flags() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = write(&dir, "log_format = \"json\"\n[fetch]\nout = \"/tmp/x\"\n");
        let parsed = cli(&["p2p-node", "--config", &file, "fetch", "m"]).expect("out from file");
        let Some(crate::cli::Command::Fetch(fetch)) = parsed.command else {
            panic!("fetch");
        };
        assert_eq!(fetch.out, PathBuf::from("/tmp/x"));
        let parsed = cli(&["p2p-node", "--config", &file, "fetch", "--", "-model-"])
            .expect("flags go before --");
        let Some(crate::cli::Command::Fetch(fetch)) = parsed.command else {
            panic!("fetch");
        };
        assert_eq!(fetch.target, "-model-");
        let file = write(&dir, "[train]\ncreate = \"spec.toml\"\n");
        let parsed = cli(&["p2p-node", "--config", &file, "train", "--new-run"])
            .expect("--create from the file");
        let Some(crate::cli::Command::Train(train)) = parsed.command else {
            panic!("train");
        };
        assert!(train.new_run && train.create.is_some());
    }

    #[test]
    fn a_section_of_another_subcommand_is_checked_too() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = write(&dir, "[fetch]\ntimeout = -5\n");
        let message = cli(&["p2p-node", "--config", &file, "id"])
            .expect_err("bad timeout")
            .to_string();
        assert!(
            message.contains("[fetch]") && message.contains("-5"),
            "{message}"
        );
    }

    #[test]
    fn only_a_regular_file_is_read() {
        for special in ["/dev/zero", "/dev/null", "/"] {
            let message = cli(&["p2p-node", "--config", special, "id"])
                .expect_err(special)
                .to_string();
            assert!(message.contains("not a regular file"), "{message}");
        }
    }

    #[test]
    fn the_command_line_turns_off_a_switch_the_file_turns_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = write(&dir, "no_mdns = true\n[train]\nno_averaging = true\n");
        let parsed =
            cli(&["p2p-node", "--config", &file, "train", "--no-mdns=false"]).expect("parses");
        assert!(!parsed.common.no_mdns);
        let Some(crate::cli::Command::Train(train)) = parsed.command else {
            panic!("train");
        };
        assert!(
            train.no_averaging,
            "the file's switch holds where not overridden"
        );
        // A bare switch still works, and does not eat the next argument.
        let parsed = cli(&["p2p-node", "--no-mdns", "id"]).expect("parses");
        assert!(parsed.common.no_mdns);
    }

    #[test]
    fn values_that_look_like_numbers_survive_the_dump() {
        let dir = tempfile::tempdir().expect("temp dir");
        for value in ["007", "+7", "1.50", "5.", "12", "2.5", "true"] {
            // A model name has no '+'.
            let model = value.replace('+', "p");
            let parsed = parse(args(&[
                "p2p-node",
                "--data-dir",
                value,
                "--model",
                &model,
                "id",
            ]))
            .expect("parses");
            let dumped = dump(&parsed.matches, None, &[]);
            let file = write(&dir, &dumped);
            let again = cli(&["p2p-node", "--config", &file, "id"]).expect(value);
            assert_eq!(
                again.common.data_dir,
                Some(PathBuf::from(value)),
                "{dumped}"
            );
            assert_eq!(again.common.model, Some(model), "{dumped}");
        }
    }
}
