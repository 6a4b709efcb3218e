#!/usr/bin/env bash
# write_pins.sh VENV FILE TITLE: pin every package installed in VENV (but the project itself) into FILE.
# The local-version suffix of the CPU torch build is dropped: `torch==X` matches `X+cpu`.
set -euo pipefail
venv=$1 file=$2 title=$3
{
  echo "# $title: every package pinned, so an upstream release never"
  echo "# turns CI red. Regenerate with \`make lock\` (a deliberate commit); users of the package keep the loose"
  echo "# bounds of pyproject.toml."
  "$venv/bin/pip" freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$//'
} > "$file"
