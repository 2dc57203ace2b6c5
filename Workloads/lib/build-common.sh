# Helpers shared by the guest builds (Workloads/guest/build.sh, Workloads/images/build.sh). Sourced after
# the caller has set CACHE (its cache directory), LOG (its build log) and TMPDIRS=() (removed by its EXIT trap).

log() { printf '%s %s\n' "$(date +%T)" "$*" >>"$LOG"; }
hash_of() { cat "$@" | sha256sum | cut -c1-64; }
hash_str() { printf '%s' "$*" | sha256sum | cut -c1-64; }
# key_matches NAME KEY / key_store NAME KEY: a step's cache key, kept in $CACHE/NAME.key.
key_matches() { [[ -f "$CACHE/$1.key" && "$(cat "$CACHE/$1.key")" == "$2" ]]; }
key_store() { printf '%s' "$2" >"$CACHE/$1.key.tmp" && mv -f "$CACHE/$1.key.tmp" "$CACHE/$1.key"; }
# mktmp VAR: a scratch directory under $CACHE, removed on exit.
mktmp() { local d; d=$(mktemp -d "$CACHE/tmp.XXXXXX"); TMPDIRS+=("$d"); printf -v "$1" '%s' "$d"; }

APT_UPDATED=0
apt_update_once() {
    ((APT_UPDATED)) && return 0
    log "apt-get update"
    apt-get update -qq >>"$LOG" 2>&1
    APT_UPDATED=1
}

# Install the Debian packages that are missing (quietly; output goes to $LOG).
need_pkgs() {
    local p missing=()
    declare -A ok=()
    while read -r p st; do [[ "$st" == installed ]] && ok[$p]=1; done < <(
        dpkg-query -W -f='${Package} ${db:Status-Status}\n' "$@" 2>/dev/null || true)
    for p in "$@"; do [[ -n "${ok[$p]:-}" ]] || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1; then
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1
    fi
}
