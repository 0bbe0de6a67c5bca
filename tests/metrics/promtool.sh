# Sourced by the scripts beside it: makes `promtool` available, installing Debian's
# `prometheus` package when it is missing, or exits 1 saying why.
if ! command -v promtool >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo_cmd=""
        [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    fi
fi
command -v promtool >/dev/null || { echo "promtool is not available and could not be installed" >&2; exit 1; }
