#!/usr/bin/env bash
# Generate the credentials of a uirl deployment:
#   OUT/ca.crt, ca.key                  a private certificate authority (keep ca.key offline)
#   OUT/server.pem, server.key          the SuperLink's TLS certificate, signed by the CA
#   OUT/supernode-<i>, supernode-<i>.pub  one ECDSA key pair per silo, for SuperNode authentication
#
# Usage: deploy/generate-credentials.sh [OUT_DIR] [NUM_SILOS] [SUPERLINK_HOSTS]
#   OUT_DIR          default deploy/credentials
#   NUM_SILOS        default 3
#   SUPERLINK_HOSTS  comma-separated DNS names / IPs the SuperLink and its fleet gateway are reached at
#                    (default "superlink,fleet-gateway,localhost,127.0.0.1"); every one becomes a SAN of server.pem
# Existing files are never overwritten: delete OUT_DIR to start again.
set -euo pipefail

out="${1:-deploy/credentials}"
silos="${2:-3}"
hosts="${3:-superlink,fleet-gateway,localhost,127.0.0.1}"
days=365

command -v openssl >/dev/null || { echo "generate-credentials: openssl is required" >&2; exit 2; }
command -v ssh-keygen >/dev/null || { echo "generate-credentials: ssh-keygen is required" >&2; exit 2; }
[[ "$silos" =~ ^[1-9][0-9]*$ ]] || { echo "generate-credentials: NUM_SILOS must be a positive integer, got '$silos'" >&2; exit 2; }

mkdir -p "$out"
umask 077

san=""
IFS=',' read -ra names <<< "$hosts"
for h in "${names[@]}"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san="${san:+$san,}IP:$h"; else san="${san:+$san,}DNS:$h"; fi
done

if [[ ! -f "$out/ca.crt" ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -days "$days" -nodes \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=uirl deployment CA" 2>/dev/null
fi

if [[ ! -f "$out/server.pem" ]]; then
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -nodes -keyout "$out/server.key" -out "$out/server.csr" \
    -subj "/CN=${names[0]}" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$out/server.ext"
  openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -out "$out/server.pem" -days "$days" -sha256 -extfile "$out/server.ext" 2>/dev/null
  rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
fi

for ((i = 0; i < silos; i++)); do
  key="$out/supernode-$i"
  [[ -f "$key" ]] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "uirl-silo-$i" -f "$key"
done

# Certificates and public keys are public; private keys stay readable by their owner only.
chmod 644 "$out"/ca.crt "$out"/server.pem "$out"/supernode-*.pub
echo "generate-credentials: wrote CA, SuperLink certificate (SAN $san) and $silos SuperNode key pairs to $out"
