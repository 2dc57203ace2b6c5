#!/usr/bin/env sysbench
-- Debian's sysbench oltp_read_write, timed per transaction and aggregated per interval.
--
-- sysbench's own --report-interval is whole seconds and counts per process; the migration benchmark needs
-- 250 ms intervals, latency percentiles per interval, and a client that can be killed and restarted
-- against another address (Workloads/loadgen/sysbench_load.py does that). This script runs the unchanged
-- /usr/share/sysbench/oltp_read_write.lua (the same transactions: BEGIN, 10 point selects, 4 range
-- selects, 2 updates, a delete and an insert, COMMIT) and wraps three of its functions:
--
--   event()        each call is one transaction; it is timed with clock_gettime(CLOCK_REALTIME) (LuaJIT
--                  ffi) and added to this thread's record for the interval it completed in. A call that
--                  fails counts one error instead (then sysbench restarts the event if the error is in
--                  --mysql-ignore-errors, else stops: sysbench_load.py restarts sysbench).
--   thread_init()  writes a C record once connected and prepared; so does each reconnect sysbench makes
--                  itself (only with connection errors in --mysql-ignore-errors; see sysbench_load.py).
--   thread_done()  writes what is left.
--
-- Every connect (drv:connect(), through sysbench.sql.driver) holds an flock on --epcopy-connect-lock:
-- QEMU's user-networking hostfwd listens with a backlog of 1, so parallel connects lose SYNs and wait for
-- 1, 3, 7 s retransmits (8 threads did not initialise within sysbench's 30 s).
--
-- Records go to file descriptor --epcopy-fd (a pipe the driver holds), one write(2) each (< PIPE_BUF,
-- so records of different threads never interleave):
--
--   E <thread> <interval> <transactions> <errors> <reads> <writes> <latency_us>,<latency_us>,...
--   C <thread> <unix_s>
--
-- interval k covers [origin + k * len, origin + (k + 1) * len) on the wall clock (--epcopy-origin, unix s,
-- --epcopy-interval-ms). reads/writes are the SQL statements of those transactions (BEGIN/COMMIT not
-- counted). A thread aggregates its current interval and writes it when a transaction completes in a
-- later interval, or once --epcopy-flush-ms have passed since its last write; with 0 (the default) it
-- writes after every transaction, so a sysbench killed while its threads hang in a query (the VM is
-- stopped during a migration) loses no completed transaction. The driver merges the threads' records.
--
-- Also adds the command `warmup` (parallel over --threads): per table, a full scan of the clustered index
-- (PRIMARY) and of the secondary index k_N, which loads the whole table into the InnoDB buffer pool.
--
--   sysbench oltp_intervals.lua --tables=4 --table-size=250000 --mysql-host=H --mysql-port=P \
--       --epcopy-origin=$(date +%s.%N) --threads=8 --time=60 run 3>records

local ffi = require("ffi")

-- Own names bound to the libc symbols (asm labels): sysbench may have declared some of these already.
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } epcopy_timespec_t;
int epcopy_clock_gettime(int clk_id, epcopy_timespec_t *tp) __asm__("clock_gettime");
long epcopy_write(int fd, const char *buf, size_t count) __asm__("write");
int epcopy_open(const char *path, int flags, int mode) __asm__("open");
int epcopy_close(int fd) __asm__("close");
int epcopy_flock(int fd, int operation) __asm__("flock");
]]
local CLOCK_REALTIME = 0
local O_RDWR_CREAT_CLOEXEC = 0x2 + 0x40 + 0x80000
local LOCK_EX, LOCK_UN = 2, 8
local MAX_LATENCIES_PER_RECORD = 300 -- 300 * 9 bytes stays below PIPE_BUF (4096)

local ts = ffi.new("epcopy_timespec_t")
local function now()
   ffi.C.epcopy_clock_gettime(CLOCK_REALTIME, ts)
   return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

-- The unchanged Debian workload (defines event, thread_init, thread_done, prepare_statements, the options).
local script = os.getenv("EPCOPY_OLTP_SCRIPT")
   or (package.searchpath and package.searchpath("oltp_read_write", package.path))
   or "/usr/share/sysbench/oltp_read_write.lua"
dofile(script)

sysbench.cmdline.options.epcopy_origin =
   {"Unix time (s) at which interval 0 starts (required for run)", 0}
sysbench.cmdline.options.epcopy_interval_ms = {"Interval length, ms", 250}
sysbench.cmdline.options.epcopy_fd = {"File descriptor the interval records are written to", 3}
sysbench.cmdline.options.epcopy_flush_ms =
   {"Write a thread's interval record at least this often (0: after every transaction)", 0}
sysbench.cmdline.options.epcopy_connect_lock =
   {"File to flock around each connect (empty: no lock)", ""}

local function emit(line)
   local n = ffi.C.epcopy_write(sysbench.opt.epcopy_fd, line, #line)
   if n ~= #line then
      error(string.format("oltp_intervals: write to fd %d failed (%d of %d bytes)",
                          sysbench.opt.epcopy_fd, tonumber(n), #line))
   end
end

-- Serialise connects across the threads of this process (and of any other process using the same file).
local function with_connect_lock(fn, ...)
   local path = sysbench.opt.epcopy_connect_lock
   local fd = -1
   if path ~= nil and path ~= "" then
      fd = ffi.C.epcopy_open(path, O_RDWR_CREAT_CLOEXEC, 384)
      if fd >= 0 then
         ffi.C.epcopy_flock(fd, LOCK_EX)
      end
   end
   local ok, err = pcall(fn, ...)
   if fd >= 0 then
      ffi.C.epcopy_flock(fd, LOCK_UN)
      ffi.C.epcopy_close(fd)
   end
   if not ok then
      error(err, 0)
   end
end

-- Every connection made through sysbench.sql.driver() (oltp_common's thread_init, warmup below) is made
-- under the lock; the statements are prepared after it, in parallel.
local sql_driver = sysbench.sql.driver
function sysbench.sql.driver(...)
   local drv = sql_driver(...)
   local proxy = {}
   function proxy.connect(_)
      local con
      with_connect_lock(function() con = drv:connect() end)
      return con
   end
   function proxy.name(_)
      return drv:name()
   end
   return proxy
end

-- Statements per transaction, from the same options oltp_read_write.lua reads.
local function statements_per_transaction()
   local o = sysbench.opt
   local reads = o.point_selects
   if o.range_selects then
      reads = reads + o.simple_ranges + o.sum_ranges + o.order_ranges + o.distinct_ranges
   end
   return reads, o.index_updates + o.non_index_updates + 2 * o.delete_inserts
end

-- Per-thread state (each sysbench thread has its own Lua state).
local cur = {interval = nil, n = 0, errors = 0, lat = {}, last_write = 0}
local origin, interval_s, flush_s, reads_per_tx, writes_per_tx

local function flush(t)
   if cur.interval ~= nil and (cur.n > 0 or cur.errors > 0) then
      local lat, first, errors = cur.lat, 1, cur.errors
      repeat
         local last = math.min(#lat, first + MAX_LATENCIES_PER_RECORD - 1)
         local n = last - first + 1
         emit(string.format("E %d %d %d %d %d %d %s\n", sysbench.tid, cur.interval, n, errors,
                            n * reads_per_tx, n * writes_per_tx,
                            table.concat(lat, ",", first, last)))
         errors = 0
         first = last + 1
      until first > #lat
   end
   cur.n, cur.errors, cur.lat, cur.last_write = 0, 0, {}, t
end

local function record(t, latency_us)
   local k = math.floor((t - origin) / interval_s)
   if k ~= cur.interval then
      flush(t)
      cur.interval = k
   end
   if latency_us then
      cur.n = cur.n + 1
      cur.lat[cur.n] = latency_us
   else
      cur.errors = cur.errors + 1
   end
   if t - cur.last_write >= flush_s then
      flush(t)
   end
end

local oltp_event, oltp_thread_init, oltp_thread_done = event, thread_init, thread_done
local oltp_before_restart_event = sysbench.hooks.before_restart_event
local RECONNECTED = {[2006] = true, [2011] = true, [2013] = true, [2055] = true} -- as in oltp_common.lua

function thread_init(...)
   origin = sysbench.opt.epcopy_origin
   assert(origin and origin > 0, "oltp_intervals: --epcopy-origin=UNIX_S is required")
   interval_s = sysbench.opt.epcopy_interval_ms / 1000
   assert(interval_s > 0, "oltp_intervals: --epcopy-interval-ms must be > 0")
   flush_s = sysbench.opt.epcopy_flush_ms / 1000
   reads_per_tx, writes_per_tx = statements_per_transaction()
   oltp_thread_init(...)
   emit(string.format("C %d %.6f\n", sysbench.tid, now()))
end

function sysbench.hooks.before_restart_event(errdesc)
   if RECONNECTED[errdesc.sql_errno] then
      emit(string.format("C %d %.6f\n", sysbench.tid, now()))
   end
   if oltp_before_restart_event then
      return oltp_before_restart_event(errdesc)
   end
end

function event(...)
   local t0 = now()
   local ok, ret = pcall(oltp_event, ...)
   local t1 = now()
   if not ok then
      record(t1, nil)
      error(ret, 0) -- sysbench decides: restart the event (ignored error) or stop
   end
   record(t1, math.floor((t1 - t0) * 1e6 + 0.5))
   return ret
end

function thread_done(...)
   flush(now())
   return oltp_thread_done(...)
end

-- warmup: read every page of every table once (the buffer pool must be large enough to keep them).
local function cmd_warmup()
   local con = sysbench.sql.driver():connect()
   for i = sysbench.tid % sysbench.opt.threads + 1, sysbench.opt.tables, sysbench.opt.threads do
      local t0 = now()
      local rows = con:query_row(string.format(
         "SELECT COUNT(*) FROM sbtest%d FORCE INDEX (PRIMARY)", i))
      con:query_row(string.format("SELECT SUM(k) FROM sbtest%d FORCE INDEX (k_%d)", i, i))
      print(string.format("epcopy-warmup: sbtest%d: %s rows, PRIMARY and k_%d read in %.2f s",
                          i, tostring(rows), i, now() - t0))
   end
   con:disconnect()
end

sysbench.cmdline.commands.warmup = {cmd_warmup, sysbench.cmdline.PARALLEL_COMMAND}
