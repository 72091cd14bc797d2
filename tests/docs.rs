//! The man pages and shell completions in `docs/` are generated from the command line's own
//! definitions (`src/cli.rs`), so `--help` and the docs cannot drift apart: this test
//! regenerates them and fails when the committed files differ.
//!
//! After changing a flag or a help text: `SNAPGUARD_BLESS=1 cargo test --test docs`, and commit
//! what it wrote.

// Tests fail by panicking; the no-unwrap rule is for the request path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");

/// Every generated file, by its path under `docs/`, with its content.
fn generated() -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut cmd = snapguard::cli::command();
    cmd.build();
    man_pages(&cmd, &mut files);
    for (shell, file) in [
        (Shell::Bash, "snapguard.bash"),
        (Shell::Zsh, "_snapguard"),
        (Shell::Fish, "snapguard.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd, "snapguard", &mut out);
        files.insert(Path::new("completions").join(file), out);
    }
    files
}

/// `snapguard.1`, and `snapguard-SUB.1` for each subcommand (once built, a subcommand's
/// display name is `snapguard-SUB`).
fn man_pages(cmd: &clap::Command, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
    let name = cmd.get_display_name().unwrap_or(cmd.get_name());
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .unwrap();
    files.insert(PathBuf::from(format!("{name}.1")), page);
    // `help check` is `check --help`: no page of its own.
    if cmd.get_name() != "help" {
        for sub in cmd.get_subcommands() {
            man_pages(sub, files);
        }
    }
}

#[test]
fn man_pages_and_completions_match_the_command_line() {
    let files = generated();
    let docs = Path::new(DOCS);
    if std::env::var_os("SNAPGUARD_BLESS").is_some() {
        for (path, content) in &files {
            let path = docs.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, content).unwrap();
        }
        return;
    }
    let mut stale: Vec<String> = files
        .iter()
        .filter(|(path, content)| std::fs::read(docs.join(path)).ok().as_ref() != Some(*content))
        .map(|(path, _)| format!("docs/{}", path.display()))
        .collect();
    // A page or completion file no longer generated (a subcommand removed) is stale too.
    for dir in ["", "completions"] {
        for entry in std::fs::read_dir(docs.join(dir)).unwrap() {
            let path = Path::new(dir).join(entry.unwrap().file_name());
            let generated_kind = dir == "completions" || path.extension() == Some("1".as_ref());
            if generated_kind && !files.contains_key(&path) {
                stale.push(format!("docs/{} (no longer generated)", path.display()));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "{} differ from what src/cli.rs generates; run `SNAPGUARD_BLESS=1 cargo test --test docs` \
         and commit the result",
        stale.join(", ")
    );
}

#[test]
fn the_man_page_says_what_check_prints_and_its_exit_codes() {
    let files = generated();
    // roff escapes every `-`.
    let text = |file: &str| String::from_utf8_lossy(&files[Path::new(file)]).replace("\\-", "-");
    let page = text("snapguard-check.1");
    for words in ["stdout", "stderr", "--format json", "64", "Content-Type"] {
        assert!(page.contains(words), "snapguard-check.1 lacks {words:?}");
    }
    let main = text("snapguard.1");
    for words in ["threads", "/metrics", "SNAPGUARD_UPSTREAM", "check-config"] {
        assert!(main.contains(words), "snapguard.1 lacks {words:?}");
    }
}

/// The README's synopsis (the first block of its "Command line" section) names every flag.
#[test]
fn the_readme_synopsis_names_every_flag() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("\n## Command line")
        .expect("a Command line section")..];
    let block = section.split("```").nth(1).expect("a synopsis block");
    let cmd = snapguard::cli::command();
    let mut missing = Vec::new();
    for c in std::iter::once(&cmd).chain(cmd.get_subcommands()) {
        for arg in c.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let named = block.contains(&format!("--{long}"))
                || arg
                    .get_short()
                    .is_some_and(|s| block.contains(&format!("-{s} ")));
            if !matches!(long, "help" | "version") && !named {
                missing.push(format!("{} --{long}", c.get_name()));
            }
        }
        if c.get_name() != "snapguard" && !block.contains(&format!("snapguard {}", c.get_name())) {
            missing.push(c.get_name().to_owned());
        }
    }
    missing.retain(|m| m != "help");
    assert!(
        missing.is_empty(),
        "README.md's synopsis lacks {missing:?}:\n{block}"
    );
}
