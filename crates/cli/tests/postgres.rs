//! A real database on an mcow disk (issue 14): PostgreSQL (the Debian package) keeps its data
//! directory on ext4 on an mcow disk, seen through `nbdfuse` and a loop device, while `pgbench`
//! commits transactions; `mcow serve` is killed with SIGKILL in the middle of the run. The
//! server, the FUSE mount, the loop device, the mount and PostgreSQL are guards that are undone
//! even when the test fails. A missing tool (postgres, pgbench, pg_amcheck, nbdfuse...) fails
//! the test, it never skips. Needs root (loop devices, mounts, running as user `postgres`).

mod common;
#[path = "common/nbd.rs"]
mod nbd;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nbd::*;

/// The directory of PostgreSQL's programs (the newest of Debian's /usr/lib/postgresql/N/bin);
/// panics with what to install if there is none.
fn pg_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is required by this test but /usr/lib/postgresql/*/bin/postgres is missing: \
             install postgresql (scripts/install-deps.sh)"
        ),
    }
}

/// One of PostgreSQL's programs; panics if it is not installed.
fn pg_bin(name: &str) -> PathBuf {
    let p = pg_bin_dir().join(name);
    assert!(p.exists(), "{} is missing: install postgresql (scripts/install-deps.sh)", p.display());
    p
}

/// A PostgreSQL program run under `timeout`, as root (the clients) or as `user` (initdb).
fn pg_cmd(name: &str, cwd: &Path, user: Option<(u32, u32)>) -> Command {
    let mut c = Command::new(tool("timeout"));
    c.args(["-k", "5", &TIMEOUT_SECS.to_string()]).arg(pg_bin(name)).current_dir(cwd).stdin(Stdio::null());
    c.env_remove("PGHOST").env_remove("PGPORT").env_remove("PGDATABASE").env("PGUSER", "postgres");
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
    }
    c
}

/// Runs a PostgreSQL program; returns its output whatever the exit code.
fn pg_run(name: &str, cwd: &Path, user: Option<(u32, u32)>, args: &[&str]) -> Run {
    let o = pg_cmd(name, cwd, user).args(args).output().expect("running a PostgreSQL program");
    let r = Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(r.code != 124 && r.code != 137, "{name} {args:?} timed out:\n{}{}", r.stdout, r.stderr);
    r
}

/// Runs a PostgreSQL program and asserts it exits 0; returns stdout.
fn pg_ok(name: &str, cwd: &Path, user: Option<(u32, u32)>, args: &[&str]) -> String {
    let r = pg_run(name, cwd, user, args);
    assert_eq!(
        r.code, 0,
        "{name} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        r.code, r.stdout, r.stderr
    );
    r.stdout
}

/// The uid and gid of the `postgres` user (Debian's package creates it).
fn postgres_user() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let r = tool_run("id", Path::new("/"), &[flag, "postgres"]);
        assert_eq!(
            r.code, 0,
            "no user `postgres`: install postgresql (scripts/install-deps.sh): {}",
            r.stderr
        );
        r.stdout.trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

/// A running postmaster (as user `postgres`, in its own process group, listening on a Unix
/// socket only). Dropping it kills the whole group with SIGKILL.
struct Postgres {
    child: Option<Child>,
    sock: PathBuf,
    log: PathBuf,
}

impl Postgres {
    fn start(cwd: &Path, user: (u32, u32), data: &Path, sock: &Path, log: &Path) -> Postgres {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(pg_bin("postgres"))
            .arg("-D")
            .arg(data)
            .arg("-k")
            .arg(sock)
            .args(["-c", "listen_addresses=", "-c", "fsync=on", "-c", "synchronous_commit=on"])
            .current_dir(cwd)
            .uid(user.0)
            .gid(user.1)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting postgres");
        let mut pg = Postgres { child: Some(child), sock: sock.to_path_buf(), log: log.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(TIMEOUT_SECS.into());
        loop {
            let r = pg_run("pg_isready", cwd, None, &["-q", "-h", sock.to_str().unwrap(), "-d", "postgres"]);
            if r.code == 0 {
                break;
            }
            if let Some(st) = pg.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited ({st}) before accepting connections:\n{}", pg.log());
            }
            assert!(Instant::now() < deadline, "postgres not ready within {TIMEOUT_SECS} s:\n{}", pg.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `psql -c SQL` against database postgres; returns the unaligned, tuples-only output.
    fn sql(&self, cwd: &Path, sql: &str) -> String {
        let h = self.sock.to_str().unwrap();
        pg_ok(
            "psql",
            cwd,
            None,
            &["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", h, "-d", "postgres", "-c", sql],
        )
    }

    /// Fast shutdown (SIGINT); asserts the postmaster exits 0.
    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        send_signal(child.id(), "INT");
        let st = wait_timeout(&mut child, Duration::from_secs(30));
        let log = self.log();
        let Some(st) = st else {
            kill_group(child.id());
            let _ = child.wait();
            panic!("postgres did not shut down within 30 s:\n{log}");
        };
        assert!(st.success(), "postgres exited with {st} on shutdown:\n{log}");
    }
}

/// SIGKILL to every process of the group `pgid` (the postmaster and its backends).
fn kill_group(pgid: u32) {
    let _ = Command::new(tool("kill")).args(["-KILL", "--", &format!("-{pgid}")]).status();
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(child.id());
            let _ = wait_timeout(&mut child, Duration::from_secs(20));
        }
    }
}

/// Waits until no loop device holds `file` any more (`losetup -d` lets go asynchronously, and
/// the FUSE mount is busy until it has).
fn wait_loop_released(file: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tool_ok("losetup", Path::new("/"), &["-j", file.to_str().unwrap()]).trim().is_empty() {
        assert!(
            Instant::now() < deadline,
            "a loop device still holds {} 20 s after losetup -d",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One pgbench transaction (TPC-B, as pgbench's built-in script) that also records which
/// transaction of which client it is: `n` counts each client's transactions from 1, as
/// pgbench's per-transaction log does, and (client, n) goes into table `committed` in the same
/// transaction.
const TX_SCRIPT: &str = r"\set n :n + 1
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO committed (client, n) VALUES (:client_id, :n);
END;
";

/// The transactions pgbench's `--log` files say completed: (client, transaction number). A
/// line is written once the transaction's COMMIT was acknowledged; failed or skipped ones are
/// marked in the time column and left out.
fn logged_commits(dir: &Path) -> BTreeSet<(u64, u64)> {
    let mut done = BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert!(f.len() >= 6, "unexpected pgbench log line {line:?}");
            if f[2].parse::<u64>().is_ok() {
                done.insert((f[0].parse().unwrap(), f[1].parse().unwrap()));
            }
        }
    }
    done
}

/// Tried: a 512 MiB disk (an ext4 filesystem imported as its sealed layer, PostgreSQL's data
/// directory written into its top) served by `mcow serve`, mounted through nbdfuse + a loop
/// device; `initdb`, `pgbench -i -s 2`, then 4 pgbench clients committing TPC-B transactions
/// (each also inserting its (client, number) into a table) for 10 s, and `kill -9` of the
/// server 4 s into the run. PostgreSQL then fails on I/O errors; everything is torn down and
/// the server restarted on the same disk.
/// Must hold: the run was cut short (pgbench aborts); `mcow check` after the kill finds no
/// corruption (debris at most); PostgreSQL runs crash recovery and opens; every transaction
/// pgbench logged as committed is there, each client's transactions are 1..k without gaps and
/// at most one more than pgbench saw (the one in flight); the TPC-B balances add up (no half
/// transaction); `pg_amcheck` (heap, every index with --heapallindexed) finds nothing; after a
/// clean shutdown `e2fsck -fn` is clean, and so is `mcow check` once the server stopped.
#[test]
fn postgres_recovers_every_committed_transaction_after_mcow_serve_is_killed() {
    let user = postgres_user();
    for name in ["postgres", "initdb", "pgbench", "psql", "pg_isready", "pg_amcheck"] {
        pg_bin(name);
    }
    for name in ["nbdfuse", "losetup", "mount", "umount", "mkfs.ext4", "e2fsck", "kill", "id"] {
        tool(name);
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    // The postgres user must reach its socket directory and the mount point.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    tool_ok("mkfs.ext4", dir, &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "img", "512M"]);
    mcow_ok(dir, &["import", "-q", "img", "base"]);
    std::fs::remove_file(dir.join("img")).unwrap();
    mcow_ok(dir, &["create", "-q", "--from", "base", "d"]);
    let (fusemnt, mnt, sock, logs) =
        (dir.join("fuse"), dir.join("mnt"), dir.join("pgsock"), dir.join("pgbench-log"));
    for d in [&fusemnt, &mnt, &sock, &logs] {
        std::fs::create_dir(d).unwrap();
    }
    std::os::unix::fs::chown(&sock, Some(user.0), Some(user.1)).unwrap();
    let data = mnt.join("pgdata");
    let pglog = dir.join("postgres.log");
    std::fs::write(dir.join("tx.sql"), TX_SCRIPT).unwrap();

    // Set up, and run pgbench until the server is killed.
    let srv = Serve::start(dir, &["d"]);
    let fuse = FuseFile::mount(&fusemnt, &srv.unix_uri("d"));
    let lo = Loop::attach(&fuse.file);
    let mount = Mount::attach(lo.dev(), &mnt);
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(user.0), Some(user.1)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let data_s = data.to_str().unwrap();
    pg_ok(
        "initdb",
        dir,
        Some(user),
        &["-D", data_s, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"],
    );
    let pg = Postgres::start(dir, user, &data, &sock, &pglog);
    let h = sock.to_str().unwrap();
    pg_ok("pgbench", dir, None, &["-h", h, "-i", "-q", "-s", "2", "postgres"]);
    pg.sql(dir, "CREATE TABLE committed (client int, n int, PRIMARY KEY (client, n))");

    let bench_out = dir.join("pgbench.out");
    let out = std::fs::File::create(&bench_out).unwrap();
    let mut bench = Command::new(pg_bin("pgbench"))
        .args(["-h", h, "-n", "-f", "../tx.sql", "-D", "n=0", "-s", "2", "-T", "10", "-c", "4", "-j", "2"])
        .args(["-l", "--log-prefix=tx", "postgres"])
        .env("PGUSER", "postgres")
        .current_dir(&logs)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("starting pgbench");
    std::thread::sleep(Duration::from_secs(4));
    let early = bench.try_wait().unwrap();
    if early.is_some() {
        panic!(
            "pgbench ended before the kill ({early:?}):\n{}",
            std::fs::read_to_string(&bench_out).unwrap()
        );
    }
    send_signal(srv.pid(), "KILL");
    // PostgreSQL PANICs on the first failed fsync and pgbench's clients abort; if the database
    // hangs on the dead disk instead, killing it ends pgbench too.
    let st = match wait_timeout(&mut bench, Duration::from_secs(20)) {
        Some(st) => st,
        None => {
            kill_group(pg.child.as_ref().unwrap().id());
            wait_timeout(&mut bench, Duration::from_secs(20))
                .expect("pgbench still runs after postgres was killed")
        }
    };
    let bench_text = std::fs::read_to_string(&bench_out).unwrap();
    assert!(!st.success(), "pgbench finished normally: the kill was not mid-run?\n{bench_text}");
    let processed: u64 = bench_text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .unwrap_or_else(|| panic!("no transaction count in pgbench's output:\n{bench_text}"))
        .trim()
        .parse()
        .unwrap();
    let logged = logged_commits(&logs);
    assert_eq!(logged.len() as u64, processed, "pgbench's log and summary disagree:\n{bench_text}");
    assert!(processed >= 20, "only {processed} transactions before the kill:\n{bench_text}");

    // Tear down the dead stack: postgres, the mount, the loop device, the FUSE mount.
    let crash_log = pg.log();
    drop(pg);
    mount.finish();
    let fuse_file = fuse.file.clone();
    lo.finish();
    wait_loop_released(&fuse_file);
    drop(fuse);
    drop(srv);
    let r = mcow_in(dir, &["check", "d"]);
    assert!(
        r.code == 0 || r.code == 3,
        "mcow check after kill -9: exit {}:\n{}{}",
        r.code,
        r.stdout,
        r.stderr
    );

    // Restart on the same disk: PostgreSQL recovers from its WAL.
    let srv = Serve::start(dir, &["d"]);
    let fuse = FuseFile::mount(&fusemnt, &srv.unix_uri("d"));
    let lo = Loop::attach(&fuse.file);
    let mount = Mount::attach(lo.dev(), &mnt);
    let pg = Postgres::start(dir, user, &data, &sock, &pglog);
    let recovery_log = pg.log()[crash_log.len()..].to_string();
    assert!(
        recovery_log.contains("automatic recovery in progress"),
        "postgres did not run crash recovery:\n{recovery_log}"
    );

    let mut per_client: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    for line in pg.sql(dir, "SELECT client, count(*), min(n), max(n) FROM committed GROUP BY client").lines()
    {
        let f: Vec<u64> = line.split('|').map(|x| x.parse().unwrap()).collect();
        per_client.insert(f[0], (f[1], f[2], f[3]));
    }
    let present: BTreeSet<(u64, u64)> = pg
        .sql(dir, "SELECT client, n FROM committed")
        .lines()
        .map(|l| {
            let (c, n) = l.split_once('|').unwrap();
            (c.parse().unwrap(), n.parse().unwrap())
        })
        .collect();
    let lost: Vec<_> = logged.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} committed transactions lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    for (client, &(count, min, max)) in &per_client {
        assert!(
            min == 1 && count == max,
            "client {client}: transactions {min}..{max} but {count} rows (a gap)"
        );
        let seen = logged.iter().filter(|(c, _)| c == client).count() as u64;
        assert!(
            max <= seen + 1,
            "client {client}: {max} transactions in the database, pgbench saw {seen} end"
        );
    }
    let sums = pg.sql(
        dir,
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), \
         (SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), \
         (SELECT count(*) FROM pgbench_history), (SELECT count(*) FROM committed)",
    );
    let v: Vec<&str> = sums.trim().split('|').collect();
    assert!(
        v[0] == v[1] && v[1] == v[2] && v[2] == v[3],
        "TPC-B balances disagree (accounts|tellers|branches|history): {sums}"
    );
    assert_eq!(v[4], v[5], "pgbench_history and committed differ in rows (a half transaction): {sums}");
    eprintln!(
        "pgbench saw {processed} commits before the kill; the recovered database holds {} (per client: {per_client:?})",
        present.len()
    );
    let r = pg_run(
        "pg_amcheck",
        dir,
        None,
        &["-h", h, "--install-missing", "--heapallindexed", "--rootdescend", "-d", "postgres"],
    );
    assert!(
        r.code == 0 && r.stdout.trim().is_empty(),
        "pg_amcheck (exit {}):\n{}{}",
        r.code,
        r.stdout,
        r.stderr
    );

    // A clean shutdown: the filesystem and the disk check clean.
    pg.stop();
    mount.finish();
    let r = tool_run("e2fsck", dir, &["-fn", lo.dev()]);
    assert_eq!(r.code, 0, "e2fsck -fn after recovery:\n{}{}", r.stdout, r.stderr);
    let fuse_file = fuse.file.clone();
    lo.finish();
    wait_loop_released(&fuse_file);
    fuse.finish();
    srv.stop();
    let r = mcow_in(dir, &["check", "d"]);
    assert_eq!(r.code, 0, "mcow check after the clean stop:\n{}{}", r.stdout, r.stderr);
}
