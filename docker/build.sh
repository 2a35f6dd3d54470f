#!/usr/bin/env bash
# Build the CPU image (docker/Dockerfile) on this machine, as root: `make docker`.
#
#   docker/build.sh [extra docker build args...]
#
# Each step is skipped when its result is already there, so a second run reuses everything:
#   1. Docker: `apt-get install docker.io` where dockerd is missing; where no daemon answers,
#      start `dockerd --iptables=false` in the background (log: $DASO_DOCKERD_LOG) and wait
#      until `docker info` works. The daemon is left running.
#   2. The base image: $DASO_BASE (debian:bookworm) if present or pullable; else
#      daso-base:bookworm, made where missing with `debootstrap --variant=minbase bookworm`
#      from the Debian mirror apt uses and `docker import` (no registry needed).
#   3. The build context: the torch CPU wheels of pip's find-links folders (or $DASO_WHEELS)
#      into docker/wheels/, the host's /usr/local/share/ca-certificates/*.crt (or $DASO_CA_DIR;
#      empty: none) into docker/local-ca/ (local only: the build stage, not the image), the
#      host's pip index URL and proxies as build args; then `docker build --network host`.
#
# Environment: DASO_IMAGE (daso:cpu), DASO_BASE, DASO_WHEELS, DASO_CA_DIR, DASO_DOCKERD_LOG.
# Exit status 77: Docker cannot be used on this machine (the reason is the last line on
# stderr); tests/cluster/test_docker.py skips on it. Any other failure exits non-zero as usual.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
image=${DASO_IMAGE:-daso:cpu}
base=${DASO_BASE:-debian:bookworm}
local_base=daso-base:bookworm
suite=bookworm
dockerd_log=${DASO_DOCKERD_LOG:-/var/log/daso-dockerd.log}

say() { echo "docker/build.sh: $*" >&2; }
unusable() { say "docker unusable here: $*"; exit 77; }
as_root() { [[ $(id -u) -eq 0 ]]; }

# ---- 1. the Docker client and daemon ----
apt_install() {
  as_root || unusable "not root: cannot apt-get install $*"
  command -v apt-get >/dev/null || unusable "no apt-get to install $*"
  say "apt-get install $*"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

docker_up() { timeout 20 docker info >/dev/null 2>&1; }

if ! docker_up; then
  if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    apt_install docker.io
  fi
  if ! docker_up; then
    as_root || unusable "no Docker daemon answers and, not being root, cannot start one"
    if ! pgrep -x dockerd >/dev/null; then
      say "starting dockerd --iptables=false (log: $dockerd_log)"
      mkdir -p "$(dirname "$dockerd_log")"
      # its own session, so that it outlives this script and the caller's terminal
      setsid dockerd --iptables=false >>"$dockerd_log" 2>&1 </dev/null &
    fi
    for _ in $(seq 60); do
      docker_up && break
      sleep 1
    done
    docker_up || unusable "dockerd did not come up in 60 s; its log ends: $(tail -n 3 "$dockerd_log" 2>/dev/null | tr '\n' ' ')"
  fi
fi
say "docker daemon $(docker version --format '{{.Server.Version}}')"

# ---- 2. the base image ----
has_image() { docker image inspect "$1" >/dev/null 2>&1; }

# the first Debian mirror (not the security one) of apt's sources, one-line or deb822 format
apt_mirror() {
  local f url
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    url=$(awk '$1 == "deb" && !/security/ { for (i = 2; i <= NF; i++)
            if ($i ~ /^[a-z]+:\/\// && $i ~ /debian/) { print $i; exit } }' "$f")
    [[ -n $url ]] && { echo "$url"; return; }
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    url=$(awk '/^URIs:/ && !/security/ && /debian/ { print $2; exit }' "$f")
    [[ -n $url ]] && { echo "$url"; return; }
  done
  echo http://deb.debian.org/debian
}

make_local_base() {
  local mirror
  mirror=$(apt_mirror)
  command -v debootstrap >/dev/null || apt_install debootstrap
  base_dir=$(mktemp -d /var/tmp/daso-base.XXXXXX)
  trap 'rm -rf "$base_dir" "$base_dir.log"' EXIT
  local dir=$base_dir
  say "debootstrap --variant=minbase $suite from $mirror (a few minutes)"
  debootstrap --variant=minbase "$suite" "$dir" "$mirror" >"$dir.log" 2>&1 \
    || { tail -n 20 "$dir.log" >&2; exit 1; }
  rm -f "$dir.log"
  # the host's apt settings for its mirror (a snapshot mirror's Release files may be past
  # their Valid-Until), so that apt-get in the image reads the same mirror as the host
  grep -lr 'Check-Valid-Until' /etc/apt/apt.conf.d/ 2>/dev/null | while read -r conf; do
    cp "$conf" "$dir/etc/apt/apt.conf.d/"
  done
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | docker import - "$local_base" >/dev/null
  rm -rf "$dir"
  trap - EXIT
  say "made $local_base"
}

if ! has_image "$base"; then
  if [[ -z ${DASO_BASE:-} ]] && has_image "$local_base"; then
    base=$local_base
  elif timeout 60 docker pull "$base" >/dev/null 2>&1; then
    say "pulled $base"
  elif [[ -n ${DASO_BASE:-} ]]; then
    say "DASO_BASE=$base is neither present nor pullable"
    exit 1
  else
    say "no $base and no registry: making $local_base"
    make_local_base
    base=$local_base
  fi
fi
say "base image $base"

# ---- 3. the build context and the build ----
shopt -s nullglob
rm -f docker/wheels/*.whl docker/local-ca/*.crt
pip_config() { python3 -m pip config get "$1" 2>/dev/null || true; }
wheels=${DASO_WHEELS:-${PIP_FIND_LINKS:-$(pip_config global.find-links)}}
for folder in $wheels; do
  folder=${folder#file://}
  for wheel in "$folder"/torch-*.whl; do
    cp -l "$wheel" docker/wheels/ 2>/dev/null || cp "$wheel" docker/wheels/
  done
done
staged=(docker/wheels/*.whl)
if [[ ${#staged[@]} -gt 0 ]]; then
  say "torch from the staged wheel(s): ${staged[*]##*/}"
else
  say "no torch wheel staged: torch comes from PyTorch's CPU index"
fi
ca_dir=${DASO_CA_DIR-/usr/local/share/ca-certificates}
if [[ -n $ca_dir ]]; then
  for cert in "$ca_dir"/*.crt; do cp "$cert" docker/local-ca/; done
fi
build_args=(--build-arg "BASE=$base")
index=${PIP_INDEX_URL:-$(pip_config global.index-url)}
[[ $index == http* ]] && build_args+=(--build-arg "PIP_INDEX_URL=$index")
proxy=$(pip_config global.proxy)
[[ -n $proxy ]] && build_args+=(--build-arg "HTTPS_PROXY=$proxy" --build-arg "HTTP_PROXY=$proxy")
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  [[ -n ${!var:-} ]] && build_args+=(--build-arg "$var=${!var}")
done
say "docker build -t $image (base $base)"
start=$SECONDS
status=0
previous=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
docker build --network host "${build_args[@]}" -t "$image" -f docker/Dockerfile "$@" . || status=$?
rm -f docker/wheels/*.whl docker/local-ca/*.crt
[[ $status -eq 0 ]] || exit "$status"
# the image this build replaced, now untagged (kept if a container or another tag uses it)
if [[ -n $previous && $previous != "$(docker image inspect --format '{{.Id}}' "$image")" ]]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
say "built $image in $((SECONDS - start)) s"
