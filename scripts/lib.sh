# Shared by scripts/demo and scripts/test (sourced, not run): the project's own virtual
# environment in .venv, so nothing is ever pip-installed into the system Python (PEP 668), and
# Debian/Ubuntu packages installed with apt when we are root.

# apt_install PACKAGE...: install what is missing; without root or apt, say what to install.
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "please install (as root): apt-get install ${missing[*]}" >&2
    return 1
  fi
  echo "installing ${missing[*]}" >&2
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_venv: .venv exists and has pip; Debian and Ubuntu ship the venv module apart
# (python3-venv), so it is installed first when creating the environment fails.
ensure_venv() {
  if [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; then
    return 0
  fi
  rm -rf .venv
  if ! python3 -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    apt_install python3-venv || return 1
    python3 -m venv .venv
  fi
}

# pip_install ARGS...: into .venv, quietly.
pip_install() {
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@"
}
