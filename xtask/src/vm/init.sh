#!/bin/sh
# PID 1 of the vmtest guest (busybox sh). Built into the initramfs by xtask/src/vm/initramfs.rs.
#
# It runs `portexhaust selftest` and a short `trace --json` session over a real exhaustion for
# each backend in $PXH_BACKENDS (or, with PXH_MODE=bench, the benchmarks), and reports on a serial port of its own (ttyS1) so that kernel
# messages on the console (ttyS0) never interleave with the records. The record format is
# parsed by xtask/src/vm/protocol.rs: keep the two in step.
#
# It must always end in `poweroff -f`: the host treats a guest that stops talking as hung.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# portexhaust mounts tracefs itself when it is missing; mounting it here too costs nothing
# and lets the facts below be read.
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf 2>/dev/null

. /vmtest/env

# The results port. `clocal` so that opening it never waits for a carrier; `raw` so that
# nothing is translated. Each record is written with its own open/close: closing a tty waits
# until its output is sent, so nothing is lost at poweroff.
R=/dev/ttyS1
if ! [ -c $R ] || ! stty -F $R clocal raw -echo 2>/dev/null; then
    echo "vmtest: no $R, reporting on the console"
    R=/dev/console
fi
say() { echo "$*" > $R; }
# send_file NAME PATH: the file as base64 between markers (busybox base64 wraps its lines).
send_file() {
    {
        echo "@@PXH-FILE name=$1@@"
        [ -f "$2" ] && base64 "$2"
        echo "@@PXH-EOF name=$1@@"
    } > $R
}
fact() { say "@@PXH-FACT name=$1 value=$2@@"; }
now() { date +%s; }
finish() {
    dmesg > /tmp/dmesg.txt 2>&1
    tail -n 150 /tmp/dmesg.txt > /tmp/dmesg.tail
    send_file dmesg /tmp/dmesg.tail
    say "@@PXH-DONE@@"
    echo "vmtest: done, powering off"
    sync
    poweroff -f
    # Not reached; if poweroff failed, panic=-1 turns init's exit into a reboot, which
    # -no-reboot turns into QEMU exiting.
    exit 1
}

say "@@PXH-BOOTED release=$(uname -r)@@"
echo "vmtest: /init running on $(uname -r)"

for m in /vmtest/modules/*.ko; do
    [ -f "$m" ] || continue
    if insmod "$m" 2>/tmp/insmod.err; then
        fact "insmod:$(basename "$m")" ok
    else
        fact "insmod:$(basename "$m")" "failed:$(tr ' ' '_' < /tmp/insmod.err)"
    fi
done

ip link set lo up

# What the kernel offers, for the report (values must not contain spaces).
yesno() { if [ -e "$1" ]; then echo yes; else echo no; fi; }
fact btf "$(yesno /sys/kernel/btf/vmlinux)"
fact kprobe_pmu "$(yesno /sys/bus/event_source/devices/kprobe)"
if head -n 1 /sys/kernel/tracing/available_filter_functions >/dev/null 2>&1; then
    fact available_filter_functions readable
else
    fact available_filter_functions unreadable
fi
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
# "[none] integrity confidentiality" -> none
lockdown=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/security/lockdown 2>/dev/null)
fact lockdown "${lockdown:-unknown}"

if [ "$PXH_MODE" = boot ]; then
    finish
fi

if ! [ -x /usr/bin/portexhaust ]; then
    say "@@PXH-FACT name=payload value=missing@@"
    finish
fi

# step_begin BACKEND STEP: lets the host name the step a hung guest was stuck in.
step_begin() {
    say "@@PXH-BEGIN backend=$1 step=$2@@"
    echo "vmtest: $1 $2"
}

# `cargo xtask bench --vm`: instead of the checks, the bench harness (the host's own xtask
# binary) runs the plan in /vmtest/bench-plan.json; it reports progress on $R itself as
# @@PXH-LOG lines, and its results travel back as a file.
if [ "$PXH_MODE" = bench ]; then
    # --vm-exec: the developer's own commands first (for digging into a result).
    for f in /vmtest/exec/*; do
        [ -f "$f" ] || continue
        n=$(basename "$f")
        step_begin exec "$n"
        t0=$(now)
        timeout -s KILL "$PXH_BENCH_TIMEOUT" sh "$f" > /tmp/exec.$n.out 2>&1 < /dev/null
        rc=$?
        t1=$(now)
        send_file "exec.$n.out" /tmp/exec.$n.out
        say "@@PXH-STEP backend=exec step=$n exit=$rc secs=$((t1 - t0))@@"
    done
    step_begin bench run
    t0=$(now)
    timeout -s KILL "$PXH_BENCH_TIMEOUT" pxh-xtask bench-guest \
        --plan /vmtest/bench-plan.json --out /tmp/bench.json --log $R \
        > /tmp/bench.out 2> /tmp/bench.err < /dev/null
    rc=$?
    t1=$(now)
    send_file bench.json /tmp/bench.json
    send_file bench.err /tmp/bench.err
    say "@@PXH-STEP backend=bench step=run exit=$rc secs=$((t1 - t0))@@"
    finish
fi

run_selftest() {
    b=$1
    step_begin "$b" selftest
    t0=$(now)
    # -s KILL: a selftest that ignores SIGTERM must not outlive its budget.
    timeout -s KILL "$PXH_STEP_TIMEOUT" portexhaust selftest --backend "$b" \
        > /tmp/$b.selftest.out 2> /tmp/$b.selftest.err < /dev/null
    rc=$?
    t1=$(now)
    send_file "$b.selftest.out" /tmp/$b.selftest.out
    send_file "$b.selftest.err" /tmp/$b.selftest.err
    say "@@PXH-STEP backend=$b step=selftest exit=$rc secs=$((t1 - t0))@@"
    return $rc
}

# alive PID: running and not a zombie (the shell reaps its children only when it waits, and
# `kill -0` succeeds on a zombie).
alive() {
    [ -r /proc/$1/stat ] || return 1
    state=$(sed 's/.*) //' /proc/$1/stat 2>/dev/null | cut -d' ' -f1)
    [ -n "$state" ] && [ "$state" != Z ]
}

# wait_ready PID STDERR: sets ready=1 once the session said "ready" (attaching can take many
# seconds under emulation), ready=0 if it ended or the step's budget ran out first.
wait_ready() {
    ready=0
    i=0
    while [ $i -lt $((PXH_STEP_TIMEOUT * 5)) ]; do
        if grep -q ready "$2" 2>/dev/null; then
            ready=1
            break
        fi
        alive $1 || break
        usleep 200000
        i=$((i + 1))
    done
}

# stop_session PID: sets stop=self|int|term.
# --duration is only the backstop: once the workload is done (and the last events had a
# moment to reach user space), Ctrl-C ends the session with its summary, as a user would.
# A background job of a non-interactive shell starts with SIGINT ignored; a program may
# keep it so, hence SIGTERM (also documented to end a session) if SIGINT did nothing.
stop_session() {
    stop=self
    if alive $1; then
        sleep 1
        stop=int
        kill -INT $1 2>/dev/null
        i=0
        while alive $1 && [ $i -lt 25 ]; do
            usleep 200000
            i=$((i + 1))
        done
        if alive $1; then
            stop=term
            kill -TERM $1 2>/dev/null
        fi
    fi
}

run_trace() {
    b=$1
    step_begin "$b" trace
    t0=$(now)
    timeout -s KILL $((PXH_TRACE_SECS + PXH_STEP_TIMEOUT)) \
        portexhaust trace --json --backend "$b" --duration "$PXH_TRACE_SECS" \
        > /tmp/$b.trace.out 2> /tmp/$b.trace.err < /dev/null &
    tpid=$!
    wait_ready $tpid /tmp/$b.trace.err
    if [ $ready = 1 ]; then
        step_begin "$b" workload
        w0=$(now)
        # In the background so that $! is the workload's own pid (timeout execs it), which
        # the trace events must carry.
        timeout -s KILL "$PXH_STEP_TIMEOUT" portexhaust workload --scenario v4 \
            --ports "$PXH_WORKLOAD_PORTS" --failures "$PXH_WORKLOAD_FAILURES" \
            > /tmp/$b.workload.out 2> /tmp/$b.workload.err < /dev/null &
        wpid=$!
        wait $wpid
        wrc=$?
        w1=$(now)
        send_file "$b.workload.out" /tmp/$b.workload.out
        send_file "$b.workload.err" /tmp/$b.workload.err
        say "@@PXH-STEP backend=$b step=workload exit=$wrc secs=$((w1 - w0)) pid=$wpid@@"
    fi
    stop_session $tpid
    wait $tpid
    trc=$?
    t1=$(now)
    send_file "$b.trace.out" /tmp/$b.trace.out
    send_file "$b.trace.err" /tmp/$b.trace.err
    say "@@PXH-STEP backend=$b step=trace exit=$trc secs=$((t1 - t0)) ready=$ready stop=$stop@@"
}

for b in $PXH_BACKENDS; do
    run_selftest "$b"
    # Exit 3 = the kernel lacks the backend. After a failed selftest the trace session still
    # runs: whether live tracing works tells the developer more about what broke.
    if [ $? != 3 ]; then
        run_trace "$b"
    fi
done

# The NAT scenario (issue 15), once per NAT hook in $PXH_NAT_HOOKS (forced with
# PORTEXHAUST_NAT_HOOK): client, router and server namespaces joined by veth pairs; the router
# masquerades the client to 10 ports, so of 13 connects 10 get through and the SYNs of the
# others are dropped at conntrack confirm (insert_failed). A fresh topology per hook: the
# first run's conntrack entries hold every NAT port for minutes. iproute2's ip (busybox's has
# no netns) and nft come from the host, with their libraries.
IP=/usr/lib/pxh/ip
NFT=/usr/lib/pxh/nft
NAT_SERVER=10.203.2.2:5000
nat_topology() {
    for ns in pxc pxr pxs; do
        $IP netns add $ns || return 1
        $IP -n $ns link set lo up || return 1
    done
    $IP link add pxc0 netns pxc type veth peer name pxr0 netns pxr || return 1
    $IP link add pxr1 netns pxr type veth peer name pxs0 netns pxs || return 1
    $IP -n pxc addr add 10.203.1.2/24 dev pxc0 && $IP -n pxc link set pxc0 up &&
        $IP -n pxc route add default via 10.203.1.1 &&
        $IP -n pxr addr add 10.203.1.1/24 dev pxr0 && $IP -n pxr addr add 10.203.2.1/24 dev pxr1 &&
        $IP -n pxr link set pxr0 up && $IP -n pxr link set pxr1 up &&
        $IP -n pxs addr add 10.203.2.2/24 dev pxs0 && $IP -n pxs link set pxs0 up || return 1
    # Forwarding in the router namespace only.
    $IP netns exec pxr sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward' || return 1
    # $1 = masq: the NAT; drop: the control, a firewall rule dropping new connections and
    # no NAT (the same NF_DROP verdict, never a confirm failure: nothing must be reported).
    if [ "$1" = drop ]; then
        printf '%s\n' 'table ip pxhnat {' '  chain filt {' \
            '    type filter hook forward priority filter; policy accept;' \
            '    ct state new tcp dport 5000 drop' \
            '  }' '}' | $IP netns exec pxr $NFT -f - || return 1
    else
        printf '%s\n' 'table ip pxhnat {' '  chain post {' \
            '    type nat hook postrouting priority srcnat; policy accept;' \
            '    oifname "pxr1" ip saddr 10.203.1.2 meta l4proto 6 masquerade to :40000-40009' \
            '  }' '}' | $IP netns exec pxr $NFT -f - || return 1
    fi
}
nat_stat() { $IP netns exec pxr cat /proc/net/stat/nf_conntrack > "$1" 2>&1; }
# run_nat HOOK masq|drop [CONNECTS]
run_nat() {
    h=$1
    b=nat-$h
    [ "$2" = drop ] && b=nat-$h-drop
    step_begin "$b" trace
    t0=$(now)
    nat_topology "$2" > /tmp/$b.setup.err 2>&1
    setup=$?
    spid=
    ready=0
    crc=
    if [ $setup = 0 ]; then
        $IP netns exec pxs portexhaust workload-nat --role server --addr $NAT_SERVER \
            > /tmp/$b.server.out 2> /tmp/$b.server.err < /dev/null &
        spid=$!
        i=0
        while ! grep -q listening /tmp/$b.server.out 2>/dev/null && [ $i -lt 50 ]; do
            usleep 100000
            i=$((i + 1))
        done
        nat_stat /tmp/$b.stat.before
        PORTEXHAUST_NAT_HOOK=$h timeout -s KILL $((PXH_TRACE_SECS + PXH_STEP_TIMEOUT)) \
            portexhaust trace --json --catch nat --duration "$PXH_TRACE_SECS" \
            > /tmp/$b.trace.out 2> /tmp/$b.trace.err < /dev/null &
        tpid=$!
        wait_ready $tpid /tmp/$b.trace.err
        if [ $ready = 1 ]; then
            timeout -s KILL "$PXH_STEP_TIMEOUT" $IP netns exec pxc portexhaust workload-nat \
                --role client --addr $NAT_SERVER --count "${3:-13}" --timeout-ms 1500 \
                > /tmp/$b.client.out 2> /tmp/$b.client.err < /dev/null
            crc=$?
        fi
        nat_stat /tmp/$b.stat.after
        stop_session $tpid
        wait $tpid
        trc=$?
    else
        trc=
    fi
    [ -n "$spid" ] && kill $spid 2>/dev/null && wait $spid 2>/dev/null
    for ns in pxc pxr pxs; do $IP netns del $ns 2>/dev/null; done
    t1=$(now)
    for f in setup.err trace.out trace.err client.out client.err server.err stat.before stat.after; do
        send_file "$b.$f" /tmp/$b.$f
    done
    say "@@PXH-STEP backend=$b step=trace exit=${trc:-none} secs=$((t1 - t0)) ready=$ready stop=${stop:-none} setup=$setup client=${crc:-none}@@"
}
for h in $PXH_NAT_HOOKS; do
    run_nat "$h" masq
    run_nat "$h" drop 2
done

# --exec: the developer's own commands (for digging into a failure), after the checks.
for f in /vmtest/exec/*; do
    [ -f "$f" ] || continue
    n=$(basename "$f")
    step_begin exec "$n"
    t0=$(now)
    timeout -s KILL "$PXH_STEP_TIMEOUT" sh "$f" > /tmp/exec.$n.out 2>&1 < /dev/null
    rc=$?
    t1=$(now)
    send_file "exec.$n.out" /tmp/exec.$n.out
    say "@@PXH-STEP backend=exec step=$n exit=$rc secs=$((t1 - t0))@@"
done

finish
