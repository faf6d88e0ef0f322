#!/bin/busybox sh
# /init of snapstack's test guest (built by test/helpers/guest-kit.ts).
#
# - Loads the virtio modules listed in /lib/modules/load-order (dependencies
#   first) so the VM's virtio-blk disks appear as /dev/vda, /dev/vdb, ...
# - Prints "READY <disks>" once the disks are there.
# - Keeps a counter in RAM (a shell variable of a background loop) and
#   prints "COUNTER <n>" on the serial console every 200 ms: after a VM
#   state is restored, the counter goes on from where it was saved.
# - Runs commands typed on the serial console, one per line:
#     CMD <id> <shell command>
#   answered with one "OUT <id> <line>" per line of output (stdout and
#   stderr) and then "DONE <id> <exit status>".
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec 0</dev/ttyS0 1>/dev/ttyS0 2>&1
stty -echo -isig -icrnl 2>/dev/null
for module in $(cat /lib/modules/load-order); do
  insmod "/lib/modules/$module.ko" || echo "GUEST insmod $module failed"
done
# virtio-blk disks are probed as the module loads; give udev-less devtmpfs a moment.
expected=$(grep -l '^0x1001$\|^0x1042$' /sys/bus/pci/devices/*/device 2>/dev/null | wc -l)
tries=0
while [ "$(ls /sys/block | grep -c '^vd')" -lt "$expected" ] && [ "$tries" -lt 50 ]; do
  sleep 0.1
  tries=$((tries + 1))
done
echo "READY $(ls /sys/block | grep '^vd' | tr '\n' ' ')"

(
  counter=0
  while true; do
    counter=$((counter + 1))
    echo "COUNTER $counter"
    sleep 0.2
  done
) &

while true; do
  if ! IFS= read -r line; then
    sleep 0.1
    continue
  fi
  line=$(echo "$line" | tr -d '\r')
  case "$line" in
    "CMD "*)
      rest=${line#CMD }
      id=${rest%% *}
      command=${rest#* }
      (eval "$command") >"/tmp/out.$id" 2>&1 </dev/null
      status=$?
      while IFS= read -r out || [ -n "$out" ]; do
        echo "OUT $id $out"
      done <"/tmp/out.$id"
      rm -f "/tmp/out.$id"
      echo "DONE $id $status"
      ;;
  esac
done
