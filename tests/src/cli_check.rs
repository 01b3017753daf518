//! Checks of a binary's clap command tree, shared by the unit tests of both binaries (each
//! includes this file with `#[path]`: the trees live in binary crates no other crate can
//! import). The house rule they keep: every flag reads an env variable and has help text, and
//! no secret-bearing flag lets `--help` print its env value.

use clap::Command;

/// Arguments that carry a URL, which may hold a password.
const SECRET_IDS: [&str; 2] = ["store", "amqp"];
/// Words in an argument's id that mark it as carrying a secret.
const SECRET_WORDS: [&str; 5] = ["url", "password", "secret", "token", "hash"];

fn is_secret(arg: &clap::Arg) -> bool {
    let id = arg.get_id().as_str();
    SECRET_IDS.contains(&id) || SECRET_WORDS.iter().any(|w| id.contains(w))
}

fn walk<'a>(cmd: &'a Command, path: &str, out: &mut Vec<(String, &'a clap::Arg)>) {
    let path = if path.is_empty() { cmd.get_name().to_string() } else { format!("{path} {}", cmd.get_name()) };
    for arg in cmd.get_arguments() {
        out.push((path.clone(), arg));
    }
    for sub in cmd.get_subcommands() {
        walk(sub, &path, out);
    }
}

/// Every argument (flag or positional) of the tree, with the command path it belongs to.
fn all_args(cmd: &Command) -> Vec<(String, &clap::Arg)> {
    let mut out = Vec::new();
    walk(cmd, "", &mut out);
    out
}

/// `command --flag` for every argument without an env variable or without help text.
pub fn missing_env_or_help(cmd: &Command) -> Vec<String> {
    all_args(cmd)
        .into_iter()
        .filter(|(_, a)| a.get_env().is_none() || (a.get_help().is_none() && a.get_long_help().is_none()))
        .map(|(path, a)| format!("{path} {} (env: {:?})", a.get_id(), a.get_env()))
        .collect()
}

/// Secret-bearing arguments whose env value `--help` would print.
pub fn secret_env_values_shown(cmd: &Command) -> Vec<String> {
    all_args(cmd)
        .into_iter()
        .filter(|(_, a)| is_secret(a))
        .filter(|(_, a)| !a.is_hide_env_values_set())
        .map(|(path, a)| format!("{path} {}", a.get_id()))
        .collect()
}

/// How many arguments the tree has (a check that the walk reached them).
pub fn count(cmd: &Command) -> usize {
    all_args(cmd).len()
}
