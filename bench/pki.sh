# Sourced by bench/qemu.sh and bench/disk.sh: make_pki DIR writes a throw-away CA and a server and
# a client certificate for localhost/127.0.0.1 there, as QEMU's tls-creds-x509 reads them.
make_pki() {
    mkdir -p "$1"
    (
        cd "$1"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench-ca -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
        for who in server client; do
            openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$who-key.pem" -out "$who.csr" 2>/dev/null
            printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$who.ext"
            openssl x509 -req -in "$who.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 -extfile "$who.ext" -out "$who-cert.pem" 2>/dev/null
        done
    )
}
