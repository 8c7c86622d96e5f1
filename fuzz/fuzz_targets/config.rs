//! Config parsing as `mailroom check-config FILE` runs it: the file read and parsed (TOML),
//! the node chosen (the first `[[node]]`), the `MAILROOM_*` environment overrides applied, then
//! every validation, the push settings' included. Also `Config::parse` on the same text.
//!
//! Input: the file's text, optionally followed by a line `#--env` and `NAME=value` lines: the
//! environment `check-config` sees. Inputs naming device files (`/dev/`, `/proc/`, `/sys/`)
//! or `*_FILE` variables are skipped: reading an endless file named by the operator is not
//! a parser bug, and the fuzzer must not read the machine's files.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mailroom::config::Config;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("mailroom-fuzz-config-{}.toml", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if ["/dev/", "/proc/", "/sys/", "_FILE"].iter().any(|p| text.contains(p)) {
        return;
    }
    let (file, env) = text.split_once("#--env\n").unwrap_or((text, ""));
    let env: Vec<(&str, &str)> = env.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());

    let _ = Config::parse(file);
    std::fs::write(path(), file).expect("write the config file");
    if let Ok((cfg, node, _applied)) = Config::load_for_node(Some(path()), None, get) {
        // What `run` does next with a config check-config accepted.
        let entry = cfg.node(&node).expect("the chosen node is configured");
        let _ = cfg.public_url(entry, None);
        let _ = cfg.lease();
    }
});
