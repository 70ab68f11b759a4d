# Sourced by .ci/run and .ci/update-newest-constraints.
# find_python X.Y VAR prints an interpreter of Python X.Y that runs: $VAR if it is set, else
# pythonX.Y on the PATH (GitHub's setup-python puts it there), else one that pyenv installed
# (pyenv's shims on the PATH may not be enabled).
find_python() {
  local version="$1" variable="$2" candidate candidates
  if [ -n "${!variable:-}" ]; then
    candidates=("${!variable}")
  else
    candidates=("python$version" "$(pyenv root 2>/dev/null)"/versions/"$version".*/bin/python"$version")
  fi
  for candidate in "${candidates[@]}"; do
    if "$candidate" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$version'" 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "No Python $version that runs (tried: ${candidates[*]}); set $variable to one." >&2
  return 1
}
