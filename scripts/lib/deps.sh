# Debian packages the scripts need, installed with apt when missing.
# Sourced by scripts/lab and scripts/test (one list, one install step).
#
#   need_packages CMD:PACKAGE ...   installs PACKAGE when CMD is not found
#                                   (CMD may be an absolute path tested with -x)

need_packages() {
    local missing=() pair cmd pkg
    for pair in "$@"; do
        cmd=${pair%%:*}
        pkg=${pair#*:}
        if [[ $cmd == /* ]]; then
            [ -x "$cmd" ] && continue
        else
            command -v "$cmd" >/dev/null && continue
        fi
        missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# What building flannel-rs needs: protoc (etcd-client's gRPC code) and a C
# compiler and linker (ring, the cc crate).
BUILD_PACKAGES=(protoc:protobuf-compiler cc:gcc)
# What `flannelctl lab up` runs or reads with: ip/bridge, ping, the
# iptables/nftables tools of --ip-masq, etcd for --store etcd.
LAB_PACKAGES=(ip:iproute2 ping:iputils-ping iptables-restore:iptables nft:nftables etcd:etcd-server)
