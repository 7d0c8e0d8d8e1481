#!/usr/bin/env bash
# Generates development certificates for the secure topology, with openssl:
#   <out>/ca.pem              CA of the client port (roles and node servers)
#   <out>/<role>.pem (+ -key) one client certificate per role, subject
#                             CN=<role>: with verify_and_map the certificate
#                             IS the NATS user (accounts-tls.conf)
#   <out>/<node>/server.pem   the node's certificate on the client port
#   <out>/route-ca.pem        a separate CA for cluster routes only, so no
#                             role certificate can join the cluster
#   <out>/<node>/route.pem    the node's route certificate (server + client)
#   nats/gen-certs.sh <out-dir> [node...]      (nodes default: n1 n2 n3)
# Subject alternative names: the node name, nats-<number> (docker-compose
# service names), localhost, 127.0.0.1 and ::1.
# Never use these in production: get certificates from your PKI.
set -euo pipefail
out=${1:?usage: gen-certs.sh <out-dir> [node...]}
shift
nodes=("$@")
[ ${#nodes[@]} -gt 0 ] || nodes=(n1 n2 n3)
roles=(admin api projector worker saga producer sys)
mkdir -p "$out"
cd "$out"
days=825
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { # ca <file-prefix> <CN>
  key "$1-key.pem"
  openssl req -x509 -new -key "$1-key.pem" -out "$1.pem" -days "$days" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" >/dev/null 2>&1
}
sign() { # sign <ca-prefix> <file-prefix> <CN> <extensions>
  key "$2-key.pem"
  openssl req -new -key "$2-key.pem" -out "$2.csr" -subj "/CN=$3" >/dev/null 2>&1
  printf '%b' "$4" > "$2.ext"
  openssl x509 -req -in "$2.csr" -CA "$1.pem" -CAkey "$1-key.pem" -CAcreateserial \
    -out "$2.pem" -days "$days" -extfile "$2.ext" >/dev/null 2>&1
  rm -f "$2.csr" "$2.ext"
}
ca ca "Sluice Dev CA"
ca route-ca "Sluice Dev Route CA"
for role in "${roles[@]}"; do
  sign ca "$role" "$role" 'extendedKeyUsage = clientAuth\n'
done
for node in "${nodes[@]}"; do
  mkdir -p "$node"
  san="subjectAltName = DNS:$node, DNS:nats-${node#n}, DNS:localhost, IP:127.0.0.1, IP:::1"
  sign ca "$node/server" "sluice-nats-$node" "$san\nextendedKeyUsage = serverAuth\n"
  sign route-ca "$node/route" "sluice-route-$node" "$san\nextendedKeyUsage = serverAuth, clientAuth\n"
done
rm -f ./*.srl
chmod 600 ./*-key.pem ./*/*-key.pem
list() { local IFS=,; echo "$*"; }
echo "certificates in $out: ca.pem, route-ca.pem, {$(list "${roles[@]}")}.pem, {$(list "${nodes[@]}")}/{server,route}.pem (+ -key.pem)"
