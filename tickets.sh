#!/bin/sh
# tickets.sh: repository-local work items and their threads.
#
# Backend (compatible with the original project's tickets.sh):
#   $WORK_ITEMS_DIR/{open,pending,closed}/ID/item.md     front matter + body
#   $WORK_ITEMS_DIR/{open,pending,closed}/ID/thread.md   append-only events
#   $WORK_ITEMS_DIR/{open,pending,closed}/ID/artifacts/
# The manual is man/tickets.sh.1.
set -eu

# Byte semantics everywhere: titles are stored as given (UTF-8 or not), slugs
# and sort orders do not depend on the caller's locale.
LC_ALL=C
export LC_ALL

PROG=tickets.sh
W=${WORK_ITEMS_DIR:-work-items}
STATUSES='open pending closed'
FIELDS='id slug title status kind priority labels created_at updated_at assignee legacy_ticket'
# Required fields that may hold an empty value (the others must not be empty).
NULLABLE='assignee legacy_ticket'

EXIT_FAILED=1
EXIT_USAGE=2
EXIT_NOT_FOUND=3
EXIT_BUSY=6

# Temporary paths owned by this run; removed on exit and on HUP/INT/TERM.
# All of them are inside the tree (never in $TMPDIR), where doctor finds what
# a killed command leaves: TMP_RUN is this run's directory $W/.run.tmp-XXXXXX
# (its pid, the body), the others sit next to the file they replace.
TMP_RUN=
TMP_BODY=
TMP_FILE=
TMP_STAGE=
TMP_LOCK=
LOCK_HELD=0

# ---------------------------------------------------------------- messages

usage() {
    cat <<'EOF'
Usage:
  tickets.sh help
  tickets.sh list [--status open|pending|closed|all]
  tickets.sh show ID-OR-SLUG
  tickets.sh create --title TITLE [--slug SLUG] [--kind KIND] [--priority P]
                    [--label a,b]...
  tickets.sh comment ID-OR-SLUG [--role comment|plan|decision|implementation_report]
                    [--author NAME] [--file PATH]
  tickets.sh review ID-OR-SLUG --approve|--request-changes [--author NAME]
                    [--file PATH]
  tickets.sh status ID-OR-SLUG open|pending|closed [--author NAME]
  tickets.sh close ID-OR-SLUG [--resolution TEXT | --file PATH] [--author NAME]
  tickets.sh doctor [--fix]
EOF
}

help_text() {
    printf '%s\n\n' 'tickets.sh - repository-local work items and their threads'
    usage
    cat <<'EOF'

Bodies of comment and review come from --file PATH (- for stdin) or, when
stdin is not a terminal, from stdin.

Backend: $WORK_ITEMS_DIR (default work-items)/{open,pending,closed}/ID/
         item.md, thread.md, artifacts/
No symbolic link may be inside it; temporary files are made inside it.
doctor --fix removes what killed commands left and closes torn events.

Exit status: 0 done, 1 failed (doctor found problems, ambiguous slug, conflict,
a symbolic link or a torn event in the way), 2 usage, 3 no such item, 6 work
items locked by another command.
See tickets.sh(1).
EOF
}

die() {
    code=$1
    shift
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit "$code"
}

# usage_error MESSAGE: exit 2 with exactly two lines on stderr: the message
# (control characters in it, such as a newline from an argument, become
# spaces) and where the full usage is.
usage_error() {
    printf '%s: error: %s\n' "$PROG" "$(printf '%s' "$*" | tr '[:cntrl:]' ' ')" >&2
    printf "Try '%s help'.\n" "$PROG" >&2
    exit "$EXIT_USAGE"
}

# ------------------------------------------------------- temp files, signals

cleanup() {
    for f in "$TMP_FILE" "$TMP_LOCK"; do
        if [ -n "$f" ]; then rm -f "$f"; fi
    done
    for f in "$TMP_STAGE" "$TMP_RUN"; do
        if [ -n "$f" ]; then rm -rf "$f"; fi
    done
    lock_release
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# Test hook: TICKETS_FAULT=POINT:kill|term ends this process at POINT, to show
# that an interrupted command leaves no half-written file behind.
fault() {
    case ${TICKETS_FAULT:-} in
        "$1:kill") kill -KILL "$$" ;;
        "$1:term") kill -TERM "$$" ;;
    esac
}

# Modes for files and directories created through mktemp (which uses 0600 and
# 0700): what an ordinary redirection or mkdir would give under this umask.
modes() {
    u=$(umask)
    FILE_MODE=$(printf '%o' $((0666 & ~0$u)))
    DIR_MODE=$(printf '%o' $((0777 & ~0$u)))
}

# mktemp_in DIR NAME: a new unpredictable temp file in DIR (same file system as
# the target, so the final mv is an atomic rename).
mktemp_in() {
    mktemp "$1/.$2.tmp-XXXXXX" || die "$EXIT_FAILED" "cannot create a temporary file in $1"
}

# run_dir: make TMP_RUN, this run's own directory for temporary files, in the
# tree. It holds our pid (in the file pid) so that doctor can tell the
# directory of a live command (one still reading its body before it takes the
# lock) from one a killed command left.
run_dir() {
    [ -z "$TMP_RUN" ] || return 0
    TMP_RUN=$(mktemp -d "$W/.run.tmp-XXXXXX") ||
        die "$EXIT_FAILED" "cannot create a temporary directory in $W"
    printf '%s\n' "$$" >"$TMP_RUN/pid" || die "$EXIT_FAILED" "cannot write $TMP_RUN/pid"
}

# ------------------------------------------------------------------- lock

# One writer at a time: the lock is a hard link $W/.lock to a file holding our
# pid (link(2) is atomic and fails if the name exists). A lock whose process is
# gone is stale and is removed, but only under a second lock $W/.lock.break and
# only if it still names that process: two waiters that saw the same dead
# holder cannot remove a fresh lock taken in between.
LOCK_FILE=$W/.lock
BREAK_FILE=$W/.lock.break

lock_acquire() {
    timeout=${TICKETS_LOCK_TIMEOUT:-10}
    case $timeout in
        '' | *[!0-9]*) usage_error "TICKETS_LOCK_TIMEOUT must be a whole number of seconds: $timeout" ;;
    esac
    TMP_LOCK=$(mktemp_in "$W" lock)
    printf '%s\n' "$$" >"$TMP_LOCK"
    tenths=0
    while ! ln "$TMP_LOCK" "$LOCK_FILE" 2>/dev/null; do
        holder=$(cat "$LOCK_FILE" 2>/dev/null || true)
        if [ -n "$holder" ] && ! kill -0 "$holder" 2>/dev/null &&
            ln "$TMP_LOCK" "$BREAK_FILE" 2>/dev/null; then
            if [ "$(cat "$LOCK_FILE" 2>/dev/null || true)" = "$holder" ]; then rm -f "$LOCK_FILE"; fi
            rm -f "$BREAK_FILE"
            continue
        fi
        if [ "$tenths" -ge $((timeout * 10)) ]; then
            die "$EXIT_BUSY" "$W is locked by process ${holder:-?} (if it is gone, remove $LOCK_FILE and $BREAK_FILE)"
        fi
        # Fractional sleep is not POSIX; where it fails, wait a whole second.
        if sleep 0.1 2>/dev/null; then tenths=$((tenths + 1)); else
            sleep 1
            tenths=$((tenths + 10))
        fi
    done
    LOCK_HELD=1
    rm -f "$TMP_LOCK"
    TMP_LOCK=
    fault locked
}

lock_release() {
    if [ "$LOCK_HELD" = 1 ]; then
        if [ "$(cat "$LOCK_FILE" 2>/dev/null || true)" = "$$" ]; then
            rm -f "$LOCK_FILE"
        fi
        LOCK_HELD=0
    fi
}

# ------------------------------------------------------------- arguments

# parse CMD "OPTIONS" MAX_POSITIONALS "$@": parse the command's arguments.
# OPTIONS names the long options CMD accepts (--name VALUE or --name=VALUE;
# approve, request-changes and fix are flags). Sets O_<name>, GIVEN (" name "...),
# NPOS, POS1, POS2. "--" ends the options; -h/--help prints the help.
parse() {
    cmd=$1
    allowed=" $2 "
    max_pos=$3
    shift 3
    NPOS=0 POS1='' POS2='' GIVEN=' '
    O_title='' O_slug='' O_kind='' O_priority='' O_label='' O_status=''
    O_role='' O_author='' O_file='' O_resolution='' O_review=''
    while [ "$#" -gt 0 ]; do
        case $1 in
            -h | --help) help_text; exit 0 ;;
            --)
                shift
                for a in "$@"; do positional "$a"; done
                break
                ;;
            --?*)
                name=${1#--}
                name=${name%%=*}
                case $allowed in
                    *" $name "*) ;;
                    *) usage_error "unknown option for $cmd: $1" ;;
                esac
                case $name in
                    approve | request-changes)
                        [ "$1" = "--$name" ] || usage_error "option --$name takes no value"
                        [ -z "$O_review" ] || [ "$O_review" = "$name" ] ||
                            usage_error "give only one of --approve and --request-changes"
                        O_review=$name
                        SHIFT=1
                        ;;
                    fix)
                        [ "$1" = "--$name" ] || usage_error "option --$name takes no value"
                        SHIFT=1
                        ;;
                    *)
                        take_value "$@"
                        case $name in
                            title) O_title=$VALUE ;;
                            slug) O_slug=$VALUE ;;
                            kind) O_kind=$VALUE ;;
                            priority) O_priority=$VALUE ;;
                            label) O_label="$O_label${O_label:+,}$VALUE" ;;
                            status) O_status=$VALUE ;;
                            role) O_role=$VALUE ;;
                            author) O_author=$VALUE ;;
                            file) O_file=$VALUE ;;
                            resolution) O_resolution=$VALUE ;;
                        esac
                        ;;
                esac
                GIVEN="$GIVEN$name "
                shift "$SHIFT"
                ;;
            -?*) usage_error "unknown option for $cmd: $1" ;;
            *)
                positional "$1"
                shift
                ;;
        esac
    done
}

positional() {
    NPOS=$((NPOS + 1))
    [ "$NPOS" -le "$max_pos" ] || usage_error "too many arguments for $cmd: $1"
    if [ "$NPOS" = 1 ]; then POS1=$1; else POS2=$1; fi
}

given() {
    case $GIVEN in
        *" $1 "*) return 0 ;;
    esac
    return 1
}

# take_value "$@": the value of the option in $1, given as --opt=VALUE or
# --opt VALUE (taken as is, even if it starts with a dash). Sets VALUE and
# SHIFT (how many arguments it used).
take_value() {
    case $1 in
        --*=*)
            VALUE=${1#*=}
            SHIFT=1
            ;;
        *)
            [ "$#" -ge 2 ] || usage_error "option $1 needs a value"
            VALUE=$2
            SHIFT=2
            ;;
    esac
}

# check_text WHAT VALUE: a one-line front-matter value: not empty, no control
# characters (a newline or tab would break item.md and the list output).
check_text() {
    [ -n "$2" ] || usage_error "$1 must not be empty"
    case $2 in
        *[[:cntrl:]]*) usage_error "$1 must not contain control characters (newline, tab, ...)" ;;
    esac
}

check_author() {
    check_text author "$1"
    case $1 in
        *[[:space:]]* | *'-->'*) usage_error "author must be one word without '-->': $1" ;;
    esac
}

check_status() {
    case $1 in
        open | pending | closed) ;;
        *) usage_error "status must be open, pending or closed: $1" ;;
    esac
}

# author_option: set AUTHOR from --author, else $USER, else the login name.
author_option() {
    if given author; then
        AUTHOR=$O_author
    else
        AUTHOR=${USER:-}
        if [ -z "$AUTHOR" ]; then AUTHOR=$(id -un 2>/dev/null || echo unknown); fi
    fi
    check_author "$AUTHOR"
}

# ----------------------------------------------------------- front matter

# Front matter is the block between a first line "---" and the next "---";
# each "key: value" line holds the raw value after one space. fm_line fills
# fm[key] (first occurrence wins) and seen[key]; fm_state is 0 (no front
# matter), 1 (not closed) or 2 (complete).
# shellcheck disable=SC2016
AWK_FM='
function fm_line(   line, i, key, val) {
    line = $0
    sub(/\r$/, "", line)
    if (FNR == 1) {
        split("", fm); split("", seen); fm_state = 0
        if (line == "---") fm_state = 1
        return
    }
    if (fm_state != 1) return
    if (line == "---") { fm_state = 2; return }
    i = index(line, ":")
    if (i < 2) return
    key = substr(line, 1, i - 1)
    if (key in seen) return
    val = substr(line, i + 1)
    sub(/^[ \t]/, "", val)
    seen[key] = 1
    fm[key] = val
}
'

# field FILE KEY: print the value of KEY in FILE's front matter.
field() {
    KEY=$2 awk "$AWK_FM"'
        { fm_line() }
        fm_state == 2 { if (ENVIRON["KEY"] in seen) print fm[ENVIRON["KEY"]]; exit }
    ' "$1"
}

# rewrite_item DIR KEY VALUE [KEY VALUE]...: replace (or add) front-matter
# fields of DIR/item.md atomically: write a temp file next to it, then mv.
rewrite_item() {
    dir=$1
    shift
    updates=
    while [ "$#" -ge 2 ]; do
        updates="$updates$1
$2
"
        shift 2
    done
    [ "$(head -n 1 "$dir/item.md" 2>/dev/null | tr -d '\r' || true)" = --- ] ||
        die "$EXIT_FAILED" "$dir/item.md has no front matter (see: $PROG doctor)"
    modes
    TMP_FILE=$(mktemp_in "$dir" item.md)
    UPDATES=$updates awk '
        BEGIN {
            n = split(ENVIRON["UPDATES"], u, "\n")
            for (i = 1; i + 1 <= n; i += 2) { want[u[i]] = u[i + 1]; order[++k] = u[i] }
        }
        { line = $0; sub(/\r$/, "", line) }
        NR == 1 { print; in_fm = (line == "---"); next }
        in_fm && line == "---" {
            for (j = 1; j <= k; j++) if (!(order[j] in done)) print order[j] ": " want[order[j]]
            in_fm = 0; print; next
        }
        in_fm {
            i = index(line, ":")
            key = i > 1 ? substr(line, 1, i - 1) : ""
            if (key in want && !(key in done)) { print key ": " want[key]; done[key] = 1; next }
        }
        { print }
    ' "$dir/item.md" >"$TMP_FILE" || die "$EXIT_FAILED" "cannot write $TMP_FILE"
    chmod "$FILE_MODE" "$TMP_FILE"
    fault item-written
    mv -f "$TMP_FILE" "$dir/item.md" || die "$EXIT_FAILED" "cannot replace $dir/item.md"
    TMP_FILE=
}

# ------------------------------------------------------------ item lookup

# resolve QUERY: set ITEM_DIR to the one item whose directory name or id is
# QUERY, else whose slug is QUERY. Exit 3 if none, 1 if several.
resolve() {
    query=$1
    [ -n "$query" ] || usage_error "an item id or slug is required"
    # Candidates as "TIER<tab>DIR" lines, kept in a variable: a read-only
    # command writes nothing, not even a temporary file.
    found=
    set --
    for st in $STATUSES; do
        for d in "$W/$st"/*; do
            [ -d "$d" ] || continue
            if [ "${d##*/}" = "$query" ]; then found="${found}1	$d
"; fi
            if [ -s "$d/item.md" ]; then set -- "$@" "$d/item.md"; fi
        done
    done
    if [ "$#" -gt 0 ]; then
        found=$found$(QUERY=$query awk "$AWK_FM"'
            function done_file(f) {
                if (fm_state == 0) return
                sub(/\/item\.md$/, "", f)
                if (fm["id"] == ENVIRON["QUERY"]) print "1\t" f
                else if (fm["slug"] == ENVIRON["QUERY"]) print "2\t" f
            }
            FNR == 1 && NR > 1 { done_file(prev) }
            { fm_line(); prev = FILENAME }
            END { if (NR > 0) done_file(prev) }
        ' "$@")
    fi
    # Tier 1 (directory name or id) wins over tier 2 (slug).
    tier=$(printf '%s\n' "$found" | grep . | cut -f 1 | sort | head -n 1)
    matches=$(printf '%s\n' "$found" | awk -F '\t' -v t="$tier" '$1 == t { print $2 }' | sort -u)
    [ -n "$matches" ] || die "$EXIT_NOT_FOUND" "no such work item: $query"
    case $matches in
        *'
'*)
            die "$EXIT_FAILED" "ambiguous work item $query; matches:
$matches"
            ;;
    esac
    ITEM_DIR=$matches
    check_item "$ITEM_DIR"
}

# ----------------------------------------------------------- symbolic links

# Nothing inside the tree may be a symbolic link (the tree itself, $W, may):
# through a link thread.md would be appended to a file elsewhere, an item
# directory or a status directory would take writes and moves out of the
# tree. Commands refuse such a tree and doctor reports every link.

# refuse_link PATH: exit 1 if PATH is a symbolic link.
refuse_link() {
    if [ -L "$1" ]; then
        die "$EXIT_FAILED" "refusing to follow the symbolic link $1 in the work items (see: $PROG doctor)"
    fi
}

# check_statuses: refuse a status directory that is a link.
check_statuses() {
    for st in $STATUSES; do refuse_link "$W/$st"; done
}

# check_item DIR: refuse the item DIR if its status directory, DIR itself or
# anything in it is a link (find does not follow a link it is given).
check_item() {
    refuse_link "${1%/*}"
    refuse_link "$1"
    link=$(find "$1" -type l -print | head -n 1)
    if [ -n "$link" ]; then refuse_link "$link"; fi
}

# dir_status DIR: the status directory DIR lives in.
dir_status() {
    parent=${1%/*}
    printf '%s\n' "${parent##*/}"
}

# -------------------------------------------------------------- bodies

# read_body FILE: copy the body into TMP_BODY in the run's directory: from
# FILE, from stdin if FILE is "-", or from stdin if it is not a terminal;
# else empty. FILE may be anything readable but a directory: a regular file,
# a FIFO or the /dev/fd/N of a process substitution, /dev/null (an empty
# body). Without a tree there is no item, so the command is bound to end in
# "no such work item": then only whether the body is empty is learnt (an
# empty comment is a usage error first), from its first byte, and nothing is
# stored or created.
read_body() {
    src=
    if [ -n "$1" ] && [ "$1" != - ]; then
        [ -e "$1" ] && [ ! -d "$1" ] && [ -r "$1" ] || usage_error "cannot read file: $1"
        src=$1
    elif [ "$1" = - ] || [ ! -t 0 ]; then
        src=-
    fi
    if [ ! -d "$W" ]; then
        TMP_BODY=
        BODY_BYTES=$(body_from "$src" | dd bs=1 count=1 2>/dev/null | wc -c | tr -d ' ')
        return 0
    fi
    run_dir
    TMP_BODY=$TMP_RUN/body
    body_from "$src" >"$TMP_BODY" || die "$EXIT_FAILED" "cannot read ${1:-stdin}"
    BODY_BYTES=$(wc -c <"$TMP_BODY" | tr -d ' ')
}

body_from() {
    case $1 in
        '') ;;
        -) cat ;;
        *) cat -- "$1" ;;
    esac
}

# body_text TEXT: the body is TEXT and a newline.
body_text() {
    run_dir
    TMP_BODY=$TMP_RUN/body
    printf '%s\n' "$1" >"$TMP_BODY" || die "$EXIT_FAILED" "cannot write $TMP_BODY"
}

# append_event DIR EVENT HEADING AUTHOR STATUS NOW: add one event with the body
# in TMP_BODY to DIR/thread.md, and bump updated_at. All or nothing: the
# thread is copied with the event added to a temp file beside it, which is
# renamed into place, so a killed command leaves the old thread or the new
# one, never part of an event that later events would follow.
append_event() {
    thread=$1/thread.md
    modes
    TMP_FILE=$(mktemp_in "$1" thread.md)
    sep=
    if [ -f "$thread" ]; then
        cat "$thread" >"$TMP_FILE" || die "$EXIT_FAILED" "cannot write $TMP_FILE"
        # A blank line between events.
        if [ -s "$thread" ]; then sep=1; fi
    fi
    {
        if [ -n "$sep" ]; then printf '\n'; fi
        printf '<!-- event: %s author: %s at: %s' "$2" "$4" "$6"
        if [ -n "$5" ]; then printf ' status: %s' "$5"; fi
        printf ' -->\n\n## %s\n\n' "$3"
    } >>"$TMP_FILE" || die "$EXIT_FAILED" "cannot write $TMP_FILE"
    if [ -s "$TMP_BODY" ]; then
        cat "$TMP_BODY" >>"$TMP_FILE" || die "$EXIT_FAILED" "cannot write $TMP_FILE"
        {
            if [ -n "$(tail -c 1 "$TMP_BODY")" ]; then printf '\n'; fi
            printf '\n'
        } >>"$TMP_FILE" || die "$EXIT_FAILED" "cannot write $TMP_FILE"
    fi
    fault event-half
    printf '%s\n' --- >>"$TMP_FILE" || die "$EXIT_FAILED" "cannot write $TMP_FILE"
    chmod "$FILE_MODE" "$TMP_FILE"
    mv -f "$TMP_FILE" "$thread" || die "$EXIT_FAILED" "cannot replace $thread"
    TMP_FILE=
    # The body (perhaps large) is not needed any more: do not leave it to a
    # kill in what follows.
    rm -rf "$TMP_RUN"
    TMP_RUN=
    rewrite_item "$1" updated_at "$6"
}

# torn FILE: true if the thread FILE ends with a torn event: it is not empty
# and its last line is not "---", the line that ends every event (a line
# ending in CR LF counts). That is what a writer killed half-way through an
# append leaves. A thread cut right after a "---" line inside an event's body
# cannot be told from a whole one; tickets.sh itself never leaves either.
torn() {
    [ -s "$1" ] || return 1
    case $(tail -c 6 "$1" | tr -d '\r' | tr '\n' '|') in
        *'|---|') return 1 ;;
    esac
    return 0
}

now() {
    t=$(date -u '+%Y%m%d-%H%M%S %Y-%m-%dT%H:%M:%SZ')
    STAMP=${t% *}
    NOW=${t#* }
}

# move_item DIR STATUS: move DIR under STATUS; sets ITEM_DIR.
move_item() {
    target=$W/$2/${1##*/}
    ITEM_DIR=$1
    [ "$1" != "$target" ] || return 0
    [ ! -e "$target" ] || die "$EXIT_FAILED" "cannot move $1: $target already exists"
    ensure_dirs
    mv "$1" "$target" || die "$EXIT_FAILED" "cannot move $1 to $target"
    ITEM_DIR=$target
}

ensure_dirs() {
    check_statuses
    for st in $STATUSES; do
        if [ ! -d "$W/$st" ]; then
            mkdir -p "$W/$st" || die "$EXIT_FAILED" "cannot create $W/$st"
            # git keeps no empty directory; doctor wants all three after a clone.
            : >"$W/$st/.gitkeep"
        fi
    done
}

# ------------------------------------------------------------- create

# slugify TEXT: lower-case ASCII letters and digits joined by single dashes,
# at most 64 characters (other bytes, including non-ASCII, become dashes).
slugify() {
    printf '%s' "$1" |
        tr '[:upper:]' '[:lower:]' |
        sed 's/[^a-z0-9][^a-z0-9]*/-/g; s/^-//' |
        cut -c 1-64 |
        sed 's/-$//'
}

# used_names: print every item directory name and id, and every slug as
# "slug:SLUG", one a line.
used_names() {
    set --
    for st in $STATUSES; do
        for d in "$W/$st"/*; do
            [ -d "$d" ] || continue
            printf '%s\n' "${d##*/}"
            if [ -s "$d/item.md" ]; then set -- "$@" "$d/item.md"; fi
        done
    done
    [ "$#" -gt 0 ] || return 0
    awk "$AWK_FM"'
        { fm_line() }
        fm_state == 2 && !(FILENAME in printed) { print "slug:" fm["slug"]; print fm["id"]; printed[FILENAME] = 1 }
    ' "$@"
}

# labels_list A,B: set LABELS to the YAML flow list "[a, b]" (labels
# trimmed, empty ones dropped).
labels_list() {
    out=
    rest=$1,
    while [ -n "$rest" ]; do
        label=${rest%%,*}
        rest=${rest#*,}
        label=$(printf '%s' "$label" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
        [ -n "$label" ] || continue
        case $label in
            *[[:cntrl:]]* | *'['* | *']'*) usage_error "a label must not contain control characters or brackets: $label" ;;
        esac
        out="$out${out:+, }$label"
    done
    LABELS="[$out]"
}

# ------------------------------------------------------------- commands

cmd_list() {
    parse list "status" 0 "$@"
    filter=open
    if given status; then filter=$O_status; fi
    case $filter in
        open | pending | closed | all) ;;
        *) usage_error "--status must be open, pending, closed or all: $filter" ;;
    esac
    printf 'status\tid\tslug\ttitle\tkind\tpriority\tupdated_at\n'
    set --
    for st in $STATUSES; do
        [ "$filter" = all ] || [ "$filter" = "$st" ] || continue
        for d in "$W/$st"/*; do
            if [ -s "$d/item.md" ]; then set -- "$@" "$d/item.md"; fi
        done
    done
    [ "$#" -gt 0 ] || return 0
    awk "$AWK_FM"'
        function row(   k, n, v, out, name) {
            n = split("status id slug title kind priority updated_at", name, " ")
            out = ""
            for (k = 1; k <= n; k++) {
                v = fm[name[k]]
                gsub(/\t/, " ", v)
                out = out (k > 1 ? "\t" : "") v
            }
            print out
        }
        FNR == 1 && NR > 1 { row() }
        { fm_line() }
        END { if (NR > 0) row() }
    ' "$@"
}

cmd_show() {
    parse show "" 1 "$@"
    [ "$NPOS" = 1 ] || usage_error "show needs an ID-OR-SLUG"
    resolve "$POS1"
    item=$ITEM_DIR/item.md
    if [ -f "$item" ]; then
        printf '# %s\n\n' "$(field "$item" title)"
        printf 'Path: %s\n' "$ITEM_DIR"
        printf 'Status: %s\n' "$(field "$item" status)"
        printf 'ID: %s\n' "$(field "$item" id)"
        printf 'Slug: %s\n\n' "$(field "$item" slug)"
        printf '## item.md\n\n'
        cat "$item"
    else
        printf 'Path: %s\n\n(missing item.md)\n' "$ITEM_DIR"
    fi
    printf '\n## thread.md\n\n'
    if [ -f "$ITEM_DIR/thread.md" ]; then cat "$ITEM_DIR/thread.md"; else printf '(missing thread.md)\n'; fi
    if [ -f "$ITEM_DIR/resolution.md" ]; then
        printf '\n## resolution.md\n\n'
        cat "$ITEM_DIR/resolution.md"
    fi
}

cmd_create() {
    parse create "title slug kind priority label" 0 "$@"
    given title || usage_error "create needs --title"
    title=$O_title
    kind=task
    priority=P2
    if given kind; then kind=$O_kind; fi
    if given priority; then priority=$O_priority; fi
    check_text title "$title"
    check_text kind "$kind"
    check_text priority "$priority"
    labels_list "$O_label"
    if given slug; then
        check_text slug "$O_slug"
        base=$(slugify "$O_slug")
        [ -n "$base" ] || usage_error "slug has no letters or digits: $O_slug"
    else
        base=$(slugify "$title")
        [ -n "$base" ] || base=item
    fi

    ensure_dirs
    lock_acquire
    now
    # A derived slug gets a numeric suffix until neither the slug nor the id
    # is in use: two creates with one title, even in the same second, differ.
    used=$(used_names)
    slug=$base
    n=1
    while :; do
        id=$STAMP-$slug
        taken=0
        if printf '%s\n' "$used" | grep -Fxq -e "slug:$slug" -e "$id"; then taken=1; fi
        for st in $STATUSES; do
            if [ -e "$W/$st/$id" ]; then taken=1; fi
        done
        [ "$taken" = 1 ] || break
        ! given slug || die "$EXIT_FAILED" "slug already in use: $slug"
        n=$((n + 1))
        slug=$base-$n
    done

    # The item is built in a hidden directory and renamed into place, so no
    # reader ever sees an item without its item.md or thread.md.
    modes
    TMP_STAGE=$(mktemp -d "$W/open/.create.tmp-XXXXXX") ||
        die "$EXIT_FAILED" "cannot create a temporary directory in $W/open"
    chmod "$DIR_MODE" "$TMP_STAGE"
    mkdir "$TMP_STAGE/artifacts"
    : >"$TMP_STAGE/artifacts/.gitkeep"
    {
        printf '%s\n' ---
        printf 'id: %s\n' "$id"
        printf 'slug: %s\n' "$slug"
        printf 'title: %s\n' "$title"
        printf 'status: open\n'
        printf 'kind: %s\n' "$kind"
        printf 'priority: %s\n' "$priority"
        printf 'labels: %s\n' "$LABELS"
        printf 'created_at: %s\n' "$NOW"
        printf 'updated_at: %s\n' "$NOW"
        printf 'assignee: null\n'
        printf 'legacy_ticket: null\n'
        printf '%s\n' ---
        printf '\n## Background\n\nCreated by tickets.sh.\n\n## Acceptance criteria\n\n- TBD\n'
    } >"$TMP_STAGE/item.md"
    printf '<!-- event: create author: tickets.sh at: %s -->\n\n## Created\n\nCreated by tickets.sh create.\n\n---\n' \
        "$NOW" >"$TMP_STAGE/thread.md"
    fault create-staged
    [ ! -e "$W/open/$id" ] || die "$EXIT_FAILED" "$W/open/$id already exists"
    mv "$TMP_STAGE" "$W/open/$id" || die "$EXIT_FAILED" "cannot create $W/open/$id"
    TMP_STAGE=
    printf '%s\n' "$id"
}

# locate QUERY: resolve QUERY, take the lock, resolve again (another command
# may have moved the item meanwhile) and insist on an item.md.
locate() {
    resolve "$1"
    lock_acquire
    resolve "$1"
    check_statuses
    [ -f "$ITEM_DIR/item.md" ] || die "$EXIT_FAILED" "$ITEM_DIR has no item.md (see: $PROG doctor)"
    # A file to be replaced by rename must be one: mv onto a directory would
    # move into it.
    for f in thread.md resolution.md; do
        if [ -e "$ITEM_DIR/$f" ] && [ ! -f "$ITEM_DIR/$f" ]; then
            die "$EXIT_FAILED" "$ITEM_DIR/$f is not a regular file (see: $PROG doctor)"
        fi
    done
    # No event is glued onto a torn one: the damage is for a person to see.
    if torn "$ITEM_DIR/thread.md"; then
        die "$EXIT_FAILED" "$ITEM_DIR/thread.md ends with a torn event (no closing ---); nothing was written (repair: $PROG doctor --fix)"
    fi
    now
}

cmd_comment() {
    parse comment "role author file" 1 "$@"
    [ "$NPOS" = 1 ] || usage_error "comment needs an ID-OR-SLUG"
    role=comment
    if given role; then role=$O_role; fi
    case $role in
        comment) heading=Comment ;;
        plan) heading=Plan ;;
        decision) heading=Decision ;;
        implementation_report) heading='Implementation report' ;;
        *) usage_error "--role must be comment, plan, decision or implementation_report: $role" ;;
    esac
    author_option
    read_body "$O_file"
    [ "$BODY_BYTES" != 0 ] || usage_error "comment needs a body: --file PATH, or pipe it on stdin"
    locate "$POS1"
    append_event "$ITEM_DIR" "$role" "$heading" "$AUTHOR" '' "$NOW"
}

cmd_review() {
    parse review "approve request-changes author file" 1 "$@"
    [ "$NPOS" = 1 ] || usage_error "review needs an ID-OR-SLUG"
    case $O_review in
        approve) verdict=approve heading='Review: approve' ;;
        request-changes) verdict=request_changes heading='Review: request changes' ;;
        *) usage_error "review needs --approve or --request-changes" ;;
    esac
    author_option
    read_body "$O_file"
    locate "$POS1"
    append_event "$ITEM_DIR" review "$heading" "$AUTHOR" "$verdict" "$NOW"
}

# set_status STATUS: move ITEM_DIR under STATUS and record it in item.md.
set_status() {
    move_item "$ITEM_DIR" "$1"
    rewrite_item "$ITEM_DIR" status "$1" updated_at "$NOW"
}

cmd_status() {
    parse status "author" 2 "$@"
    [ "$NPOS" = 2 ] || usage_error "status needs an ID-OR-SLUG and open, pending or closed"
    new=$POS2
    check_status "$new"
    author_option
    locate "$POS1"
    old=$(field "$ITEM_DIR/item.md" status)
    if [ "$old" = "$new" ] && [ "$(dir_status "$ITEM_DIR")" = "$new" ]; then
        return 0
    fi
    [ -n "$old" ] || old=$(dir_status "$ITEM_DIR")
    set_status "$new"
    body_text "Moved from $old to $new."
    append_event "$ITEM_DIR" status "Status: $new" "$AUTHOR" "$new" "$NOW"
}

cmd_close() {
    parse close "resolution file author" 1 "$@"
    [ "$NPOS" = 1 ] || usage_error "close needs an ID-OR-SLUG"
    if given resolution && given file; then usage_error "give --resolution or --file, not both"; fi
    author_option
    if given file; then
        read_body "$O_file"
    elif given resolution; then
        [ -n "$O_resolution" ] || usage_error "--resolution must not be empty"
    fi
    locate "$POS1"
    if given resolution; then
        body_text "$O_resolution"
    elif ! given file; then
        body_text Closed.
    fi
    set_status closed
    modes
    TMP_FILE=$(mktemp_in "$ITEM_DIR" resolution.md)
    cat "$TMP_BODY" >"$TMP_FILE" || die "$EXIT_FAILED" "cannot write $TMP_FILE"
    chmod "$FILE_MODE" "$TMP_FILE"
    mv -f "$TMP_FILE" "$ITEM_DIR/resolution.md" || die "$EXIT_FAILED" "cannot write $ITEM_DIR/resolution.md"
    TMP_FILE=
    append_event "$ITEM_DIR" close Closed "$AUTHOR" closed "$NOW"
}

# leftovers DIR: report temp files an interrupted command left in DIR. Two
# kinds are made outside the lock and name the pid of their command: the
# lock temp file of a command waiting for the lock, and the run directory
# of a command reading its body; they are leftovers only once it is gone.
# The others are made under the lock, which doctor holds while it looks.
leftovers() {
    for f in "$1"/.*.tmp-*; do
        # A link is reported as such (by doctor_scan), not followed.
        if [ -L "$f" ] || [ ! -e "$f" ]; then continue; fi
        case ${f##*/} in
            .lock.tmp-*) pidfile=$f ;;
            .run.tmp-*) pidfile=$f/pid ;;
            *) pidfile= ;;
        esac
        if [ -n "$pidfile" ]; then
            pid=$(cat "$pidfile" 2>/dev/null || true)
            if [ -z "$pid" ]; then
                # Just made, by a command about to write its pid: look again.
                sleep 0.1 2>/dev/null || sleep 1
                [ -e "$f" ] || continue
                pid=$(cat "$pidfile" 2>/dev/null || true)
            fi
            if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then continue; fi
        fi
        printf 'leftover temporary file: %s\n' "$f"
    done
}

# stale_locks: report a lock or break lock whose process is gone. A holder
# that released the lock and exited between the read and the kill -0 is no
# stale lock: the file must still name it afterwards.
stale_locks() {
    for f in "$LOCK_FILE" "$BREAK_FILE"; do
        # A link is reported as such (by doctor_scan), not followed.
        if [ -L "$f" ] || [ ! -f "$f" ]; then continue; fi
        holder=$(cat "$f" 2>/dev/null || true)
        if [ -n "$holder" ] && kill -0 "$holder" 2>/dev/null; then continue; fi
        [ -f "$f" ] && [ "$(cat "$f" 2>/dev/null || true)" = "$holder" ] || continue
        printf 'stale lock (process %s is gone): %s\n' "${holder:-?}" "$f"
    done
}

# doctor_scan: report every problem of the tree, one a line, unsorted.
doctor_scan() {
    if [ ! -d "$W" ]; then
        printf 'not a directory: %s\n' "$W"
        return 0
    fi
    # Every link in the tree (-H: $W itself may be one); what a link leads to
    # is not looked at.
    find -H "$W" -type l -print | sed 's/^/symbolic link: /'
    set --
    leftovers "$W"
    for st in $STATUSES; do
        [ ! -L "$W/$st" ] || continue
        if [ ! -d "$W/$st" ]; then
            printf 'missing directory: %s\n' "$W/$st"
            continue
        fi
        leftovers "$W/$st"
        for d in "$W/$st"/*; do
            if [ -L "$d" ] || [ ! -d "$d" ]; then continue; fi
            if [ -L "$d/item.md" ]; then
                :
            elif [ ! -f "$d/item.md" ]; then
                printf 'missing item.md: %s\n' "$d"
            elif [ ! -s "$d/item.md" ]; then
                printf 'missing front matter: %s\n' "$d/item.md"
            else
                set -- "$@" "$d/item.md"
            fi
            if [ -L "$d/thread.md" ]; then
                :
            elif [ ! -f "$d/thread.md" ]; then
                printf 'missing thread.md: %s\n' "$d"
            elif torn "$d/thread.md"; then
                printf 'torn event (no closing ---): %s\n' "$d/thread.md"
            fi
            if [ ! -L "$d/artifacts" ] && [ ! -d "$d/artifacts" ]; then
                printf 'missing artifacts/: %s\n' "$d"
            fi
            leftovers "$d"
        done
    done
    [ "$#" -gt 0 ] || return 0
    FIELDS=$FIELDS NULLABLE=$NULLABLE awk "$AWK_FM"'
        BEGIN {
            nf = split(ENVIRON["FIELDS"], field, " ")
            split(ENVIRON["NULLABLE"], tmp, " ")
            for (k in tmp) nullable[tmp[k]] = 1
        }
        function check(file,   k, n, part, dir, st, base) {
            if (fm_state != 2) { print "missing front matter: " file; return }
            for (k = 1; k <= nf; k++) {
                if (!(field[k] in seen))
                    print "missing required field \047" field[k] "\047: " file
                else if (fm[field[k]] == "" && !(field[k] in nullable))
                    print "empty required field \047" field[k] "\047: " file
            }
            n = split(file, part, "/")
            base = part[n - 1]
            st = part[n - 2]
            dir = substr(file, 1, length(file) - length("/item.md"))
            if (fm["id"] != "") {
                if (fm["id"] != base) print "directory name does not match id: " dir " has id " fm["id"]
                ids[fm["id"]] = ids[fm["id"]] " " dir
                nid[fm["id"]]++
            }
            if (("status" in seen) && fm["status"] != st)
                print "status mismatch: " file " says \047" fm["status"] "\047 but is under \047" st "\047"
            if (fm["slug"] != "") {
                slugs[fm["slug"]] = slugs[fm["slug"]] " " dir
                nslug[fm["slug"]]++
            }
        }
        FNR == 1 && NR > 1 { check(prev) }
        { fm_line(); prev = FILENAME }
        END {
            if (NR > 0) check(prev)
            for (k in nid) if (nid[k] > 1) print "duplicate id: " k " in" ids[k]
            for (k in nslug) if (nslug[k] > 1) print "duplicate slug: " k " in" slugs[k]
        }
    ' "$@"
}

# remove_stale_break: remove a break lock whose process is gone (it died
# while breaking a stale lock, and would keep every later command from
# breaking one), if the file still names that process.
remove_stale_break() {
    if [ -L "$BREAK_FILE" ] || [ ! -f "$BREAK_FILE" ]; then return 0; fi
    holder=$(cat "$BREAK_FILE" 2>/dev/null || true)
    if [ -n "$holder" ] && kill -0 "$holder" 2>/dev/null; then return 0; fi
    if [ "$(cat "$BREAK_FILE" 2>/dev/null || true)" = "$holder" ]; then rm -f "$BREAK_FILE"; fi
}

# close_torn THREAD: end the torn last event of THREAD: close a cut-off
# event line, add a note that the rest is lost and the closing "---"
# (copy, then rename, like any event).
close_torn() {
    modes
    TMP_FILE=$(mktemp_in "${1%/*}" thread.md)
    cat "$1" >"$TMP_FILE" || die "$EXIT_FAILED" "cannot write $TMP_FILE"
    last=$(tail -n 1 "$1" | tr -d '\r')
    {
        case $last in
            '<!--'*'-->'*) ;;
            '<!--'*) printf ' -->' ;;
        esac
        if [ -n "$(tail -c 1 "$1")" ]; then printf '\n'; fi
        printf '\n(The end of this event is lost: the command writing it was interrupted.'
        printf ' Closed by %s doctor --fix.)\n\n---\n' "$PROG"
    } >>"$TMP_FILE" || die "$EXIT_FAILED" "cannot write $TMP_FILE"
    chmod "$FILE_MODE" "$TMP_FILE"
    mv -f "$TMP_FILE" "$1" || die "$EXIT_FAILED" "cannot replace $1"
    TMP_FILE=
}

# fix_problem PROBLEM: repair what doctor reported in the line PROBLEM, if it is a
# leftover temporary file (removed) or a torn event (closed); else fail.
fix_problem() {
    path=${1#*: }
    case $1 in
        'leftover temporary file: '*)
            case ${path##*/} in
                .*.tmp-*) ;;
                *) return 1 ;;
            esac
            if [ -L "$path" ]; then return 1; fi
            rm -rf -- "$path" && [ ! -e "$path" ]
            ;;
        'torn event (no closing ---): '*)
            if [ -L "$path" ] || ! torn "$path"; then return 1; fi
            close_torn "$path"
            ;;
        *) return 1 ;;
    esac
}

cmd_doctor() {
    parse doctor "fix" 0 "$@"
    # A repository without the tree has no item yet: nothing can be damaged.
    if [ ! -e "$W" ] && [ ! -L "$W" ]; then
        printf 'doctor: nothing to check: %s does not exist (create makes it)\n' "$W"
        return 0
    fi
    # The report is kept in variables: doctor writes no temporary file, so it
    # works on a tree it may not write to.
    report=$(stale_locks)
    fixed=
    if given fix; then
        # Repair like a writer: under the lock, which breaks a stale one.
        remove_stale_break
        lock_acquire
        remove_stale_break
        stale=$report
        report=$(stale_locks)
        if [ -z "$report" ]; then fixed=$stale; fi
    elif [ -z "$report" ] && [ -d "$W" ] && [ -w "$W" ]; then
        # Look at a still tree: under the lock no command is half-way through a
        # create, a move or a rewrite (which would look like damage). A stale
        # lock is reported, not broken: that is for a person to decide.
        lock_acquire
    fi
    scan=$(doctor_scan)
    if given fix && [ -n "$scan" ]; then
        # One problem a line; paths with a newline are not fixed.
        left=
        old_ifs=$IFS
        IFS='
'
        set -f
        for problem in $scan; do
            if fix_problem "$problem"; then
                fixed="$fixed${fixed:+
}$problem"
            else
                left="$left${left:+
}$problem"
            fi
        done
        set +f
        IFS=$old_ifs
        scan=$left
    fi
    if [ -n "$report" ] && [ -n "$scan" ]; then
        report="$report
$scan"
    else
        report=$report$scan
    fi
    if [ -n "$fixed" ]; then printf '%s\n' "$fixed" | sort | sed 's/^/doctor: fixed: /'; fi
    if [ -z "$report" ]; then
        printf 'doctor: ok\n'
        return 0
    fi
    problems=$(printf '%s\n' "$report" | wc -l | tr -d ' ')
    printf '%s\n' "$report" | sort | sed 's/^/doctor: /'
    printf '%s: doctor found %s problem(s)\n' "$PROG" "$problems" >&2
    exit "$EXIT_FAILED"
}

main() {
    [ "$#" -gt 0 ] || usage_error "a command is required"
    command=$1
    shift
    case $command in
        help | -h | --help)
            [ "$#" = 0 ] || usage_error "help takes no arguments"
            help_text
            ;;
        list) cmd_list "$@" ;;
        show) cmd_show "$@" ;;
        create) cmd_create "$@" ;;
        comment) cmd_comment "$@" ;;
        review) cmd_review "$@" ;;
        status) cmd_status "$@" ;;
        close) cmd_close "$@" ;;
        doctor) cmd_doctor "$@" ;;
        *) usage_error "unknown command: $command" ;;
    esac
}

main "$@"
