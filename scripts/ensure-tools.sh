#!/usr/bin/env bash
# Checks that the external tools the interop tests drive are installed AND run
# (each answers --version), and installs the missing ones when it can.
#
#   - all present and working: prints one line and exits 0;
#   - some missing, running as root with apt-get: installs their Debian
#     packages (--no-install-recommends) and checks again;
#   - still missing: prints the packages to install. Under CI=true that is
#     fatal (exit 1), so a broken install step can never pass silently;
#     elsewhere it exits 0 and the tests that need them skip with a message.
#
# The tool -> package table is kept in step with TOOL_PACKAGES in
# test/helpers/tools.ts by test/unit/infra-ci.test.ts.
#
# Environment: SNAPSTACK_NO_APT=1 never runs apt-get.
set -euo pipefail
# nbdsh runs `python3 -m nbd` with whatever python3 is first on PATH; a pyenv
# python3 lacks Debian's nbd module, so let pyenv defer to the system one.
case "$(command -v python3 || true)" in */.pyenv/*) export PYENV_VERSION=system ;; esac

# tool package version-command (the command must exit 0 on a working install).
TOOLS=(
  "qemu-img qemu-utils qemu-img --version"
  "qemu-io qemu-utils qemu-io --version"
  "qemu-nbd qemu-utils qemu-nbd --version"
  "qemu-system-x86_64 qemu-system-x86 qemu-system-x86_64 --version"
  "nbdinfo libnbd-bin nbdinfo --version"
  "nbdcopy libnbd-bin nbdcopy --version"
  "nbdsh python3-libnbd nbdsh --version"
  "nbdkit nbdkit nbdkit --version"
  "fio fio fio --version"
  "cpio cpio cpio --version"
  "busybox busybox-static busybox true"
  "cc build-essential cc --version"
)

missing_tools=()    # absent or not working
missing_packages=() # packages of the absent tools (apt can add these)
broken_notes=()     # installed but failing: apt-get install would not change them

check_tools() {
  missing_tools=()
  missing_packages=()
  broken_notes=()
  local entry tool package output check
  for entry in "${TOOLS[@]}"; do
    read -r tool package check <<<"$entry"
    if command -v "$tool" >/dev/null 2>&1; then
      if ! output="$(read -r -a words <<<"$check" && "${words[@]}" 2>&1 </dev/null)"; then
        missing_tools+=("$tool")
        broken_notes+=("$tool is installed but '$check' fails: $(printf '%s' "$output" | head -n 2 | tr '\n' ' ')")
      fi
      continue
    fi
    missing_tools+=("$tool")
    case " ${missing_packages[*]-} " in
      *" $package "*) ;;
      *) missing_packages+=("$package") ;;
    esac
  done
}

# Exits 0 when every tool works; otherwise says what is missing or broken.
# $1: qualifier for the messages ("" or " after apt-get").
exit_if_all_present() {
  if [ "${#missing_tools[@]}" -eq 0 ]; then
    echo "ensure-tools: all present$1: $(qemu-img --version | head -n 1), $(nbdinfo --version 2>&1 | head -n 1), $(nbdkit --version | head -n 1)"
    exit 0
  fi
  echo "ensure-tools: missing or not working$1: ${missing_tools[*]}"
  for note in "${broken_notes[@]}"; do echo "ensure-tools: $note"; done
}

check_tools
exit_if_all_present ""

if [ "${#missing_packages[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ "${SNAPSTACK_NO_APT:-0}" != 1 ]; then
  echo "ensure-tools: installing with apt-get (running as root): ${missing_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing_packages[@]}"
  check_tools
  exit_if_all_present " after apt-get"
fi

hint="fix the tools named above"
if [ "${#missing_packages[@]}" -gt 0 ]; then
  hint="sudo apt-get install --no-install-recommends ${missing_packages[*]}"
fi
if [ "${CI:-}" = true ]; then
  echo "ensure-tools: CI=true and tools are missing or broken: ${missing_tools[*]}; $hint" >&2
  exit 1
fi
echo "ensure-tools: tests that need ${missing_tools[*]} will skip (absent) or fail (broken); $hint"
exit 0
