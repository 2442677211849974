#!/bin/sh
# Make real NATS passwords for a deployment: one per user (the five roles, `observer` for
# `adrenaline status`, and `route` for the NATS nodes' cluster routes), 256 random bits each, in
# hex after a letter (the route password is part of a URL, and nats-server reads a substituted
# variable as a configuration value: one starting with a digit would parse as a number). Writes an env file readable only by you; use it as
# the Secret adrenaline-nats from an overlay of your own (docs/deploy.md, "NATS credentials").
# Never commit the file: deploy/k8s/.gitignore keeps *.secret.env out of git.
set -eu
out=${1:-nats-credentials.secret.env}
if [ -e "$out" ]; then
  echo "$out exists; not overwriting it (running pods use those passwords)" >&2
  exit 1
fi
umask 077
for user in gateway scheduler prefill decode attention_executor observer route; do
  printf '%s=p%s\n' "$user" "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
done >"$out"
echo "wrote $out"
