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

run_trace() {
    b=$1
    step_begin "$b" trace
    t0=$(now)
    timeout -s KILL $((PXH_TRACE_SECS + PXH_STEP_TIMEOUT)) \
        portexhaust trace --json --backend "$b" --duration "$PXH_TRACE_SECS" \
        > /tmp/$b.trace.out 2> /tmp/$b.trace.err < /dev/null &
    tpid=$!
    # Attaching can take many seconds under emulation: wait for the word "ready".
    ready=0
    i=0
    while [ $i -lt $((PXH_STEP_TIMEOUT * 5)) ]; do
        if grep -q ready /tmp/$b.trace.err 2>/dev/null; then
            ready=1
            break
        fi
        alive $tpid || break
        usleep 200000
        i=$((i + 1))
    done
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
    # --duration is only the backstop: once the workload is done (and the last events had a
    # moment to reach user space), Ctrl-C ends the session with its summary, as a user would.
    # A background job of a non-interactive shell starts with SIGINT ignored; a program may
    # keep it so, hence SIGTERM (also documented to end a session) if SIGINT did nothing.
    stop=self
    if alive $tpid; then
        sleep 1
        stop=int
        kill -INT $tpid 2>/dev/null
        i=0
        while alive $tpid && [ $i -lt 25 ]; do
            usleep 200000
            i=$((i + 1))
        done
        if alive $tpid; then
            stop=term
            kill -TERM $tpid 2>/dev/null
        fi
    fi
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
