#!/usr/bin/env bash
# Generates a development CA, a server certificate for 127.0.0.1/localhost
# and one client certificate per Sluice role, with openssl.
#   nats/gen-certs.sh <out-dir>
# Never use these in production: get certificates from your PKI.
set -euo pipefail
out=${1:?usage: gen-certs.sh <out-dir>}
mkdir -p "$out"
cd "$out"
days=825
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca.pem \
  -days "$days" -subj "/CN=Sluice Dev CA" >/dev/null 2>&1
cat > server.ext <<EXT
subjectAltName = IP:127.0.0.1, IP:::1, DNS:localhost
extendedKeyUsage = serverAuth
EXT
openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr \
  -subj "/CN=sluice-nats" >/dev/null 2>&1
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
  -out server.pem -days "$days" -extfile server.ext >/dev/null 2>&1
for role in admin api projector worker saga; do
  printf 'extendedKeyUsage = clientAuth\n' > client.ext
  openssl req -newkey rsa:2048 -nodes -keyout "$role-key.pem" -out "$role.csr" \
    -subj "/CN=$role" >/dev/null 2>&1
  openssl x509 -req -in "$role.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
    -out "$role.pem" -days "$days" -extfile client.ext >/dev/null 2>&1
done
rm -f ./*.csr ./*.ext ./*.srl
chmod 600 ./*-key.pem
echo "certificates in $out: ca.pem, server.pem, {admin,api,projector,worker,saga}.pem (+ -key.pem)"
