#!/usr/bin/env bash
# Runs the README's ```sh blocks in order, the way a newcomer pastes them into one shell on a
# fresh clone, and checks what the README says they print.
#
#   bash tests/readme.sh
#
# What is run: every ```sh block of README.md, in order, in one bash process (so background jobs,
# `kill %1` and the like work as they do when pasted), in a copy of the repository (the files
# git tracks or would add, as a clone of this working tree has them). A block preceded by a line
# `<!-- readme-test: skip ... -->` is not run (synopses, the whole test suite, commands that serve
# until stopped).
#
# What is checked, after each command:
#   - its exit status: the number in a trailing `# exit N` comment, otherwise 0 (a command ending
#     in `&` is not checked);
#   - its output (stdout and stderr together, as a terminal shows them): each comment line right
#     below it that starts with `#` and three spaces is a line the output must have, in that
#     order; `...` in such a line stands for any text, and a line of `...` alone for any lines.
#
# Isolation: the commands use the README's fixed ports (8080, 8776, 9901). They run in a network
# namespace of their own when `unshare --net` works (as root), so nothing else on the machine can
# hold those ports and nothing leaves loopback; otherwise on the host's loopback, after checking
# that the ports are free. Every process the blocks start is in one process group, ended at the
# end (TERM, then KILL).
#
# Environment:
#   SNAPGUARD_README_PROFILE=debug   build and run target/debug/snapguard instead of the release
#                                    build (the README's `cargo build --release` and
#                                    `target/release/` are rewritten); default release
#   SNAPGUARD_README_TARGET=DIR      the cargo target directory the copy builds in (as its
#                                    target/, a symlink), so that dependencies built before are
#                                    reused; default: $CARGO_TARGET_DIR if set, else this
#                                    checkout's target/. `fresh` builds everything from scratch
#                                    inside the copy.
#
# The commands run as in a newcomer's shell: without CARGO_TARGET_DIR, RUST_LOG or any of
# snapguard's own SNAPGUARD_* settings.
#   SNAPGUARD_README_TIMEOUT=SECONDS the whole run's limit, default 900
#   SNAPGUARD_README_NETNS=0         run on the host's loopback even where a namespace would work
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
profile=${SNAPGUARD_README_PROFILE:-release}
target=${SNAPGUARD_README_TARGET:-${CARGO_TARGET_DIR:-$repo/target}}
limit=${SNAPGUARD_README_TIMEOUT:-900}
netns=${SNAPGUARD_README_NETNS:-1}
case $profile in release | debug) ;; *)
  echo "SNAPGUARD_README_PROFILE must be release or debug, not $profile" >&2
  exit 2
  ;;
esac

tmp=$(mktemp -d)
pgid=""
cleanup() {
  # Ends every process the README's commands started (one process group), then the files.
  if [ -n "$pgid" ] && kill -0 -- "-$pgid" 2>/dev/null; then
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 -- "-$pgid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A fresh clone of this working tree: tracked and addable files, nothing ignored or built.
clone=$tmp/snapguard
mkdir -p "$clone"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
  tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$clone"
if [ "$target" != fresh ]; then
  mkdir -p "$target"
  ln -s "$(cd "$target" && pwd)" "$clone/target"
fi
# Inside a network namespace cargo cannot reach the registry: fetch what the build needs first.
(cd "$clone" && env -u CARGO_TARGET_DIR cargo fetch --locked --quiet)

# The README, cut into commands with their expectations, becomes one script for one shell.
out=$tmp/out
mkdir -p "$out"
python3 - "$repo/README.md" "$out" "$profile" >"$tmp/readme-run.sh" <<'PY'
import json, re, shlex, sys

readme, out, profile = sys.argv[1], sys.argv[2], sys.argv[3]
lines = open(readme, encoding="utf-8").read().split("\n")
commands = []  # {"line", "text", "code", "exit", "expect", "background"}


def split_comment(text):
    """The command and its trailing comment: a `#` after a blank, outside quotes."""
    quote = None
    for at, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and at > 0 and text[at - 1] in " \t":
            return text[:at].rstrip(), text[at:]
    return text.rstrip(), ""


skip_next = False
i = 0
while i < len(lines):
    line = lines[i]
    if re.match(r"\s*<!--\s*readme-test:\s*skip\b", line):
        skip_next = True
    elif line.startswith("```"):
        lang = line[3:].strip()
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        body = lines[i + 1 : j]
        if lang == "sh" and not skip_next:
            k = 0
            while k < len(body):
                text, first = body[k], k
                if not text.strip() or text.lstrip().startswith("#"):
                    k += 1
                    continue
                while text.endswith("\\") and k + 1 < len(body):
                    k += 1
                    text = text + "\n" + body[k]
                k += 1
                expect = []
                while k < len(body) and body[k].lstrip().startswith("#"):
                    m = re.match(r"\s*#   (.*)$", body[k])
                    if m:
                        expect.append(m.group(1).rstrip())
                    k += 1
                code, comment = split_comment(text)
                m = re.search(r"\bexit (\d+)", comment)
                if profile == "debug":
                    code = code.replace("cargo build --release", "cargo build")
                    code = code.replace("target/release/", "target/debug/")
                commands.append({
                    "line": i + 2 + first,
                    "text": text,
                    "code": code,
                    "exit": int(m.group(1)) if m else 0,
                    "expect": expect,
                    "background": code.endswith("&") and not code.endswith("&&"),
                })
        skip_next = False
        i = j
    elif line.strip():
        skip_next = False
    i += 1

print("# Generated by tests/readme.sh from README.md: one command at a time, as pasted.")
# The process group that cleanup ends: field 5 of /proc/PID/stat (3 after the command name).
print(f"sed 's/.*) //' /proc/$$/stat | cut -d' ' -f3 >{shlex.quote(out)}/pgid")
for n, c in enumerate(commands):
    print(f"# README.md line {c['line']}")
    print("{")
    print(c["code"])
    print(f"}} >{shlex.quote(out)}/{n}.out 2>&1 </dev/null")
    print(f"echo $? >{shlex.quote(out)}/{n}.rc")
json.dump(commands, open(f"{out}/commands.json", "w"), indent=1)
PY

echo "readme: $(grep -c '^# README.md line' "$tmp/readme-run.sh") commands from README.md, in $clone ($profile build)"

# Where the commands run: a namespace of their own, or the host's loopback with the ports free.
runner=(bash)
if [ "$netns" = 1 ] && command -v unshare >/dev/null && command -v ip >/dev/null &&
  unshare --net true 2>/dev/null; then
  runner=(unshare --net bash -c 'ip link set lo up && exec bash "$0"')
  echo "readme: in a network namespace of its own (loopback only)"
else
  for port in 8080 8776 9901; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "readme: port $port on 127.0.0.1 is in use; the README's commands need it" >&2
      exit 1
    fi
  done
  echo "readme: on the host's loopback"
fi

# One process group for everything the commands start, so that cleanup finds it all.
started=$(date +%s)
set +e
(cd "$clone" && exec env -u CARGO_TARGET_DIR -u RUST_LOG -u SNAPGUARD_CONFIG -u SNAPGUARD_LISTEN \
  -u SNAPGUARD_UPSTREAM -u SNAPGUARD_ADMIN -u SNAPGUARD_LOG_FORMAT -u SNAPGUARD_THREADS \
  setsid timeout --kill-after=10 "$limit" "${runner[@]}" "$tmp/readme-run.sh") &
runner_pid=$!
for _ in $(seq 100); do
  [ -s "$out/pgid" ] && break
  kill -0 "$runner_pid" 2>/dev/null || break
  sleep 0.1
done
pgid=$(cat "$out/pgid" 2>/dev/null || true)
# Not a group leader when started, the runner keeps its id as the group's under `setsid`.
[ -n "$pgid" ] || pgid=$runner_pid
wait "$runner_pid"
status=$?
set -e
echo "readme: ran in $(($(date +%s) - started)) s"

# The checks: exit status and documented output, command by command.
python3 - "$out" "$status" <<'PY'
import json, re, sys

out, status = sys.argv[1], int(sys.argv[2])
commands = json.load(open(f"{out}/commands.json"))
passed = failed = 0

def matches(pattern, line):
    parts = [re.escape(p) for p in pattern.split("...")]
    return re.fullmatch(".*".join(parts), line) is not None

for n, c in enumerate(commands):
    try:
        output = open(f"{out}/{n}.out", encoding="utf-8", errors="replace").read()
        rc = int(open(f"{out}/{n}.rc").read())
    except (OSError, ValueError):
        print(f"FAIL README.md:{c['line']}: never ran (the run stopped or timed out)\n  $ {c['text']}")
        failed += 1
        continue
    problems = []
    if not c["background"] and rc != c["exit"]:
        problems.append(f"exit {rc}, the README says {c['exit']}")
    got = [l.rstrip("\r") for l in output.replace("\r\n", "\n").split("\n")]
    at = 0
    for want in c["expect"]:
        if want.strip() == "...":
            continue
        while at < len(got) and not matches(want, got[at]):
            at += 1
        if at == len(got):
            problems.append(f"no output line (in order) matching: {want}")
            break
        at += 1
    if problems:
        failed += 1
        print(f"FAIL README.md:{c['line']}: " + "; ".join(problems))
        print(f"  $ {c['text']}")
        for line in output.rstrip("\n").split("\n")[-40:]:
            print(f"  | {line}")
    else:
        passed += 1
        print(f"ok   README.md:{c['line']}: {c['text'].splitlines()[0][:90]}")
if status not in (0,):
    print(f"the run itself exited {status}" + (" (timed out)" if status in (124, 137) else ""))
    failed += status in (124, 137)
print(f"readme: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
