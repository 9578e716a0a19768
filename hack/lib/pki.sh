# shellcheck shell=bash
# Certificates for the local Kubernetes tiers (hack/envtest.sh,
# hack/realnode.sh): a throwaway CA, serving and client certificates, the
# service-account key pair. Sourced, not run; every function takes the PKI
# directory first.

# pki_init DIR CA_NAME SERVER_SANS: the openssl config (SERVER_SANS is the
# serving certificate's subjectAltName) and the CA.
pki_init() {
  local pki="$1"
  mkdir -p "${pki}"
  cat >"${pki}/openssl.cnf" <<EOF2
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $3
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
EOF2
  openssl genrsa -out "${pki}/ca.key" 2048 2>/dev/null
  openssl req -x509 -new -key "${pki}/ca.key" -subj "/CN=$2" \
    -days 7 -config "${pki}/openssl.cnf" -extensions ca -out "${pki}/ca.crt"
}

# pki_issue DIR NAME SUBJECT server|client: NAME.key and NAME.crt signed by the CA.
pki_issue() {
  local pki="$1" name="$2"
  openssl genrsa -out "${pki}/${name}.key" 2048 2>/dev/null
  openssl req -new -key "${pki}/${name}.key" -subj "$3" -config "${pki}/openssl.cnf" \
    -out "${pki}/${name}.csr"
  openssl x509 -req -in "${pki}/${name}.csr" -CA "${pki}/ca.crt" -CAkey "${pki}/ca.key" \
    -set_serial "$((RANDOM * 32768 + RANDOM))" -days 7 \
    -extfile "${pki}/openssl.cnf" -extensions "$4" -out "${pki}/${name}.crt" 2>/dev/null
}

# pki_service_accounts DIR: the service-account signing key pair sa.key / sa.pub.
pki_service_accounts() {
  openssl genrsa -out "$1/sa.key" 2048 2>/dev/null
  openssl rsa -in "$1/sa.key" -pubout -out "$1/sa.pub" 2>/dev/null
}
