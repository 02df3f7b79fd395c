# Sourced by the bench scripts: defines drop() (sync, then drop the page cache when this
# user may) and $cache, the sentence the results print about it.
if [ -w /proc/sys/vm/drop_caches ] && sync && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
    cache="cold: page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every timed command"
    drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
else
    cache="HOT: page caches could not be dropped (not root?); every run is hot-cache"
    drop() { sync; }
fi
