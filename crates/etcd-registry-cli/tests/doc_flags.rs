//! The docs stay true to the binary: every `etcd-registry` invocation in a
//! shell snippet of README.md and docs/*.md names a subcommand and flags
//! that the built binary's `--help` lists, and every relative link in those
//! files points at a file (and a heading) that exists.
//!
//! Only the binary's help output is read, never the CLI's sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_etcd-registry");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// README.md and every docs/*.md, as (name relative to the root, text).
fn doc_files() -> Vec<(String, String)> {
    let root = root();
    let mut names = vec!["README.md".to_owned()];
    let mut guides: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| {
            e.expect("readable docs/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    guides.sort();
    names.extend(guides);
    names
        .into_iter()
        .map(|n| {
            let text =
                std::fs::read_to_string(root.join(&n)).unwrap_or_else(|e| panic!("{n}: {e}"));
            (n, text)
        })
        .collect()
}

/// A code block: its language tag and its lines (with 1-based line numbers).
struct Block {
    lang: String,
    lines: Vec<(usize, String)>,
}

/// The fenced code blocks of a markdown text, and the prose lines outside them.
fn split_markdown(text: &str) -> (Vec<Block>, Vec<(usize, String)>) {
    let mut blocks = Vec::new();
    let mut prose = Vec::new();
    let mut current: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => {
                    current = Some(Block {
                        lang: rest.trim().to_owned(),
                        lines: Vec::new(),
                    })
                }
            }
            continue;
        }
        match current.as_mut() {
            Some(block) => block.lines.push((n, line.to_owned())),
            None => prose.push((n, line.to_owned())),
        }
    }
    assert!(current.is_none(), "an unclosed code block");
    (blocks, prose)
}

/// The shell command lines of a block: every line of `sh`/`bash`/`shell`
/// (backslash continuations joined, `#` comments dropped), the `$ ` lines
/// of `console`.
fn shell_commands(block: &Block) -> Vec<(usize, String)> {
    let console = block.lang == "console";
    if !(console || ["sh", "bash", "shell"].contains(&block.lang.as_str())) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (n, line) in &block.lines {
        let line = match (&pending, console) {
            (None, true) => match line.strip_prefix("$ ") {
                Some(cmd) => cmd.to_owned(),
                None => continue,
            },
            _ => line.clone(),
        };
        let line = strip_comment(&line);
        let (start, mut joined) = pending.take().unwrap_or((*n, String::new()));
        match line.trim_end().strip_suffix('\\') {
            Some(head) => {
                joined.push_str(head);
                joined.push(' ');
                pending = Some((start, joined));
            }
            None => {
                joined.push_str(&line);
                out.push((start, joined));
            }
        }
    }
    if let Some(p) = pending {
        out.push(p);
    }
    out
}

/// Drops a `#` comment (a `#` at the start or after whitespace, outside quotes).
fn strip_comment(line: &str) -> String {
    let mut quote: Option<char> = None;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '#' && prev_space => return line[..i].to_owned(),
            None => {}
        }
        prev_space = c.is_whitespace();
    }
    line.to_owned()
}

/// A word of a shell line; `quoted` when any of it was inside quotes
/// (such a word is a value, never a flag).
#[derive(Debug)]
struct Word {
    text: String,
    quoted: bool,
}

fn words(line: &str) -> Vec<Word> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                quoted = true;
            }
            None if c.is_whitespace() => {
                if !cur.is_empty() || quoted {
                    out.push(Word {
                        text: std::mem::take(&mut cur),
                        quoted,
                    });
                }
                quoted = false;
            }
            None => cur.push(c),
        }
    }
    if !cur.is_empty() || quoted {
        out.push(Word { text: cur, quoted });
    }
    out
}

/// One `etcd-registry` invocation found in the docs.
#[derive(Debug)]
struct Invocation {
    place: String,
    /// Flags given before the subcommand.
    global: Vec<String>,
    subcommand: Option<String>,
    /// Flags given after it (up to a lone `--`, after which CMD follows).
    flags: Vec<String>,
}

/// The invocations on one shell line: after each word `etcd-registry`
/// (or `etcd-registry-cli --`, as in `cargo run -p etcd-registry-cli -- dev`).
fn invocations(place: &str, line: &str, subcommands: &BTreeSet<String>) -> Vec<Invocation> {
    let ws = words(line);
    let mut out = Vec::new();
    let mut i = 0;
    while i < ws.len() {
        let w = &ws[i];
        // `cargo run -p etcd-registry`, `--bin etcd-registry`: a name, not a call.
        let named = i > 0 && matches!(ws[i - 1].text.as_str(), "-p" | "--package" | "--bin");
        let start = if named {
            None
        } else if !w.quoted && w.text == "etcd-registry" {
            Some(i + 1)
        } else if !w.quoted
            && w.text == "etcd-registry-cli"
            && ws.get(i + 1).is_some_and(|w| w.text == "--")
        {
            Some(i + 2)
        } else {
            None
        };
        let Some(start) = start else {
            i += 1;
            continue;
        };
        let mut inv = Invocation {
            place: place.to_owned(),
            global: Vec::new(),
            subcommand: None,
            flags: Vec::new(),
        };
        let mut depth = 0i32;
        let mut j = start;
        while j < ws.len() {
            let w = &ws[j];
            let t = w.text.as_str();
            if !w.quoted {
                // A shell separator outside the usage brackets ends the command.
                if depth == 0 && matches!(t, "|" | "||" | "&&" | ";" | "&" | ")" | ">" | "2>&1") {
                    break;
                }
                if t == "--" {
                    break;
                }
            }
            let bare = t.trim_start_matches('[').trim_end_matches(']');
            if !w.quoted {
                depth += t.matches('[').count() as i32 - t.matches(']').count() as i32;
            }
            if !w.quoted && bare.starts_with("--") && bare.len() > 2 {
                let flag = bare
                    .split('=')
                    .next()
                    .unwrap_or(bare)
                    .trim_end_matches(&[',', ')'][..])
                    .to_owned();
                if inv.subcommand.is_none() {
                    inv.global.push(flag);
                } else {
                    inv.flags.push(flag);
                }
            } else if inv.subcommand.is_none() && subcommands.contains(bare) {
                inv.subcommand = Some(bare.to_owned());
            }
            j += 1;
        }
        out.push(inv);
        i = j.max(i + 1);
    }
    out
}

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--help")
        .env_remove("ETCD_ENDPOINTS")
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "`etcd-registry {} --help` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommands listed in the top-level help's `Commands:` section.
fn subcommands(top: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let mut inside = false;
    for line in top.lines() {
        if line.trim_end() == "Commands:" {
            inside = true;
            continue;
        }
        if inside {
            if line.trim().is_empty() || !line.starts_with(' ') {
                break;
            }
            if let Some(name) = line.split_whitespace().next()
                && name != "help"
            {
                set.insert(name.to_owned());
            }
        }
    }
    set
}

/// Whether `help` lists `flag` as an option: a line of the options list
/// that starts with it (after an optional `-x, `), not a mention in prose.
fn lists(help: &str, flag: &str) -> bool {
    help.lines().any(|line| {
        let t = line.trim_start();
        let t = match t.as_bytes() {
            [b'-', c, b',', b' ', ..] if c.is_ascii_alphanumeric() => &t[4..],
            _ => t,
        };
        t.strip_prefix(flag).is_some_and(|rest| {
            !rest.starts_with(|c: char| c.is_alphanumeric() || c == '-' || c == '_')
        })
    })
}

/// The problems with the invocations: unknown subcommands and flags.
fn check(invs: &[Invocation], top: &str, helps: &mut BTreeMap<String, String>) -> Vec<String> {
    let mut bad = Vec::new();
    for inv in invs {
        for flag in &inv.global {
            if !lists(top, flag) {
                bad.push(format!(
                    "{}: `etcd-registry {flag}`: no such global flag in `etcd-registry --help`",
                    inv.place
                ));
            }
        }
        let Some(sub) = &inv.subcommand else {
            if !inv.flags.is_empty() || inv.global.iter().any(|f| f != "--help" && f != "--version")
            {
                bad.push(format!(
                    "{}: an `etcd-registry` invocation without a known subcommand",
                    inv.place
                ));
            }
            continue;
        };
        let text = helps
            .entry(sub.clone())
            .or_insert_with(|| help(&[sub]))
            .clone();
        for flag in &inv.flags {
            if !lists(&text, flag) {
                bad.push(format!(
                    "{}: `etcd-registry {sub} {flag}`: not in `etcd-registry {sub} --help`",
                    inv.place
                ));
            }
        }
    }
    bad
}

#[test]
fn every_flag_in_the_docs_shell_snippets_exists() {
    let top = help(&[]);
    let subs = subcommands(&top);
    assert!(
        subs.len() >= 10,
        "expected the subcommands in `--help`, got {subs:?}\n{top}"
    );
    let mut helps = BTreeMap::new();

    // The checker itself catches a flag that does not exist.
    let fake = invocations("self-test", "etcd-registry list --no-such-flag web", &subs);
    assert_eq!(check(&fake, &top, &mut helps).len(), 1, "{fake:?}");
    let fake = invocations("self-test", "etcd-registry --no-such-global list", &subs);
    assert_eq!(check(&fake, &top, &mut helps).len(), 1, "{fake:?}");

    let mut all = Vec::new();
    for (name, text) in doc_files() {
        let (blocks, _) = split_markdown(&text);
        for block in &blocks {
            for (n, line) in shell_commands(block) {
                all.extend(invocations(&format!("{name}:{n}"), &line, &subs));
            }
        }
    }
    let with_flags = all
        .iter()
        .filter(|i| !i.flags.is_empty() || !i.global.is_empty())
        .count();
    assert!(
        all.len() >= 40 && with_flags >= 20,
        "too few invocations found: {} ({with_flags} with flags)",
        all.len()
    );
    let bad = check(&all, &top, &mut helps);
    assert!(
        bad.is_empty(),
        "{} problems in the docs:\n{}",
        bad.len(),
        bad.join("\n")
    );
    let used: BTreeSet<&str> = all.iter().filter_map(|i| i.subcommand.as_deref()).collect();
    eprintln!(
        "checked {} invocations ({with_flags} with flags) of {} subcommands: {used:?}",
        all.len(),
        used.len()
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let (_, prose) = split_markdown(text);
    prose
        .iter()
        .filter_map(|(_, l)| {
            let t = l.trim_start();
            let hashes = t.chars().take_while(|c| *c == '#').count();
            (1..=6).contains(&hashes).then(|| slug(&t[hashes..]))
        })
        .collect()
}

/// The `](target)` links of the prose lines (code blocks and code spans left out).
fn links(prose: &[(usize, String)]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose {
        // Drop code spans, which may hold `](` that is not a link.
        let mut text = String::new();
        for (k, part) in line.split('`').enumerate() {
            if k % 2 == 0 {
                text.push_str(part);
            }
        }
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            out.push((*n, rest[..end].to_owned()));
            rest = &rest[end..];
        }
    }
    out
}

#[test]
fn relative_links_in_the_docs_point_at_existing_files_and_headings() {
    let root = root();
    let mut checked = 0;
    let mut bad = Vec::new();
    for (name, text) in doc_files() {
        let (_, prose) = split_markdown(&text);
        let dir = Path::new(&name)
            .parent()
            .unwrap_or(Path::new(""))
            .to_path_buf();
        for (n, target) in links(&prose) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                root.join(&name)
            } else {
                root.join(&dir).join(file)
            };
            if !path.exists() {
                bad.push(format!(
                    "{name}:{n}: `{target}`: no file {}",
                    path.display()
                ));
                continue;
            }
            if let Some(anchor) = anchor {
                let target_text = std::fs::read_to_string(&path).unwrap_or_default();
                if path.extension().is_some_and(|e| e == "md")
                    && !anchors(&target_text).contains(anchor)
                {
                    bad.push(format!(
                        "{name}:{n}: `{target}`: no heading with anchor #{anchor}"
                    ));
                }
            }
        }
    }
    assert!(checked >= 30, "too few relative links found: {checked}");
    assert!(
        bad.is_empty(),
        "{} broken links:\n{}",
        bad.len(),
        bad.join("\n")
    );
    eprintln!("checked {checked} relative links");
}
