#!/usr/bin/env bash
# Builds dmar's container images without any registry.
#
#   deploy/build-images.sh                 # host-built binaries on FROM scratch (default)
#   deploy/build-images.sh --multi-stage   # deploy/Dockerfile (needs rust and debian images)
#
# Default path: `cargo build --release` on the host (the three binaries, the health probe
# dmar-healthcheck, deploy/healthcheck/, and the host tool dmar-certs that deploy/dmar.sh
# runs to make the stack's certificates), then one build context per image under
# $CARGO_TARGET_DIR/deploy-images/NAME/ holding a rootfs/ with the binary, every shared
# library `ldd` lists, the dynamic loader, a minimal /etc and /tmp, and the image's
# Dockerfile from deploy/images/. Also builds the Prometheus image from the host's Debian
# `prometheus` package (installed with apt-get when missing).
#
# Images: dmar-server, dmar-agent, dmar-loadgen, dmar-prometheus, all tagged
# $DMAR_IMAGE_TAG (default "local"), which is what deploy/docker-compose.yml runs.
#
# Options:
#   --multi-stage     build the dmar images from deploy/Dockerfile instead (registry needed)
#   --no-cargo        reuse the release binaries already built
#   --no-prometheus   skip the Prometheus image
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

tag=${DMAR_IMAGE_TAG:-local}
target=${CARGO_TARGET_DIR:-$root/target}
case $target in /*) ;; *) target=$root/$target ;; esac
multi_stage=0 cargo=1 prometheus=1
for arg in "$@"; do
    case $arg in
        --multi-stage) multi_stage=1 ;;
        --no-cargo) cargo=0 ;;
        --no-prometheus) prometheus=0 ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build-images: unknown option $arg" >&2; exit 2 ;;
    esac
done

say() { printf 'build-images: %s\n' "$*"; }
revision=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
labels=(--label "org.opencontainers.image.revision=$revision" --label "org.opencontainers.image.title=dmar")

if [ "$multi_stage" = 1 ]; then
    # dmar-certs runs on the host, not in an image.
    if [ "$cargo" = 1 ]; then
        say "cargo build --release -p dmar-auth (dmar-certs, a host tool)"
        cargo build --quiet --release --locked -p dmar-auth
    fi
    for name in dmar-server dmar-agent dmar-loadgen; do
        say "docker build --target $name (deploy/Dockerfile)"
        docker build -f deploy/Dockerfile --target "$name" -t "$name:$tag" "${labels[@]}" .
    done
else
    if [ "$cargo" = 1 ]; then
        say "cargo build --release (dmar-server, dmar-agent, dmar-loadgen, dmar-healthcheck, dmar-certs)"
        cargo build --quiet --release --locked -p dmar-server -p dmar-agent -p dmar-loadgen -p dmar-healthcheck \
            -p dmar-auth
    fi
    mkdir -p "$target/deploy-images"
    probe=$target/release/dmar-healthcheck
    [ -x "$probe" ] || { echo "build-images: $probe is missing (run without --no-cargo)" >&2; exit 1; }
fi

# Copies a dynamically linked executable into rootfs at DEST, with the libraries and the
# loader `ldd` names, at the paths the loader will look for them.
install_elf() {
    local rootfs=$1 src=$2 dest=$3 lib
    mkdir -p "$rootfs$(dirname "$dest")"
    cp "$src" "$rootfs$dest"
    # Debug info stays in the host's target/; the image gets the code only.
    strip --strip-debug "$rootfs$dest" 2>/dev/null || true
    for lib in $(ldd "$src" | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }'); do
        [ -e "$rootfs$lib" ] && continue
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
    done
}

# A fresh context dir with rootfs/, a minimal /etc and /tmp, and the image's Dockerfile.
new_context() {
    local name=$1 ctx=$target/deploy-images/$1
    rm -rf "$ctx"
    mkdir -p "$ctx/rootfs/etc" "$ctx/rootfs/tmp"
    chmod 1777 "$ctx/rootfs/tmp"
    # glibc's resolver reads this; the Go resolver in Prometheus too.
    printf 'hosts: files dns\n' >"$ctx/rootfs/etc/nsswitch.conf"
    printf 'root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/:/nonexistent\n' >"$ctx/rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$ctx/rootfs/etc/group"
    cp "deploy/images/$name.Dockerfile" "$ctx/Dockerfile"
    echo "$ctx"
}

build_context() {
    local name=$1 ctx=$2
    say "docker build $name:$tag ($(du -sh "$ctx/rootfs" | cut -f1) rootfs)"
    # The legacy builder warns about itself on every build: show its output on failure only.
    docker build -q -t "$name:$tag" "${labels[@]}" "$ctx" >"$ctx/build.log" 2>&1 || {
        cat "$ctx/build.log" >&2
        exit 1
    }
}

if [ "$multi_stage" = 0 ]; then
    for name in dmar-server dmar-agent dmar-loadgen; do
        bin=$target/release/$name
        [ -x "$bin" ] || { echo "build-images: $bin is missing (run without --no-cargo)" >&2; exit 1; }
        ctx=$(new_context "$name")
        install_elf "$ctx/rootfs" "$bin" "/usr/local/bin/$name"
        install_elf "$ctx/rootfs" "$probe" /usr/local/bin/dmar-healthcheck
        build_context "$name" "$ctx"
    done
fi

if [ "$prometheus" = 1 ]; then
    if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || {
            echo "build-images: the Prometheus image needs the 'prometheus' binary (Debian package prometheus)" >&2
            exit 1
        }
        sudo_cmd=""
        [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
        say "apt-get install prometheus (for its binaries)"
        $sudo_cmd apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends prometheus >/dev/null
        # The package starts a system service; this machine only wants the binaries.
        $sudo_cmd service prometheus stop >/dev/null 2>&1 || true
    fi
    ctx=$(new_context prometheus)
    install_elf "$ctx/rootfs" "$(command -v prometheus)" /bin/prometheus
    install_elf "$ctx/rootfs" "$(command -v promtool)" /bin/promtool
    mkdir -p "$ctx/rootfs/etc/prometheus" "$ctx/rootfs/prometheus"
    chmod 0777 "$ctx/rootfs/prometheus"
    cp deploy/prometheus/prometheus.yml deploy/prometheus/rules.yml "$ctx/rootfs/etc/prometheus/"
    build_context dmar-prometheus "$ctx"
fi

say "done: $(docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^(dmar-[a-z]+):$tag " | tr '\n' ' ')"
