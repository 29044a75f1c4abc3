# Shared by bench-write.sh and bench-pgbench.sh (source it; it only defines functions): start one
# of the NBD servers they compare on a fresh writable copy of one base, and read a process's CPU
# time. Each server serves export "disk" on RUN/sock:
#   mcow      `mcow serve` of a fresh writable top on the mcow disk RUN/base (`mcow create --from`)
#   qemu-nbd  a fresh qcow2 overlay of BASE_RAW, writeback cache, 16 clients
#   nbdkit    `nbdkit file` on a sparse copy of BASE_RAW

# cpu_ticks PID: the user + system clock ticks PID has used (0 once it is gone).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# start_write_server KIND RUN BASE_RAW LOG [MCOW_BIN]: starts server KIND (above; MCOW_BIN is
# the mcow that serves, default $MCOW, which also creates the disk) with its stderr appended to
# LOG, and waits until nbdinfo reaches it. Sets PID and URI; exits 1 if it does not come up.
start_write_server() {
    local kind=$1 run=$2 base=$3 log=$4 bin=${5:-$MCOW} i
    rm -rf "$run/target" "$run"/target.* "$run/sock"
    case $kind in
        mcow)
            "$MCOW" create -q --from "$run/base" "$run/target" >/dev/null
            "$bin" serve -k "$run/sock" "disk=$run/target" 2>>"$log" &
            ;;
        qemu-nbd)
            qemu-img create -q -f qcow2 -b "$(realpath "$base")" -F raw "$run/target.qcow2"
            qemu-nbd -t -f qcow2 --cache=writeback --shared=16 -k "$run/sock" -x disk \
                "$run/target.qcow2" 2>>"$log" &
            ;;
        nbdkit)
            cp --sparse=always --reflink=auto "$base" "$run/target.raw"
            nbdkit -f -U "$run/sock" -e disk file "$run/target.raw" 2>>"$log" &
            ;;
        *) echo "start_write_server: unknown server $kind" >&2; exit 2 ;;
    esac
    PID=$!
    URI="nbd+unix:///disk?socket=$run/sock"
    for ((i = 0; i < 2000; i++)); do
        if [[ -S $run/sock ]] && nbdinfo --size "$URI" >/dev/null 2>&1; then return 0; fi
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.01
    done
    echo "$kind failed to start: $(tail -c 300 "$log")" >&2
    exit 1
}
