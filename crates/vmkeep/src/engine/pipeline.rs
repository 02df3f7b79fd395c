//! An ordered parallel pipeline: a planner hands out jobs, several workers run them
//! (read, hash, compress), and the caller's thread consumes the results in job order
//! (write). Queues are bounded and a window caps the jobs in flight, so memory stays
//! bounded whatever the disk size; the first error stops everything.

use std::collections::BTreeMap;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::error::Result;

/// Run `next_job` → `work` (on `workers` threads) → `sink` (here, in job order), with at
/// most `window` jobs between planning and sinking.
pub fn ordered<J, O>(
    workers: usize,
    window: usize,
    mut next_job: impl FnMut() -> Result<Option<J>> + Send,
    work: impl Fn(J) -> Result<O> + Sync,
    mut sink: impl FnMut(O) -> Result<()>,
) -> Result<()>
where
    J: Send,
    O: Send,
{
    let workers = workers.max(1);
    let window = window.max(workers);
    let (job_tx, job_rx) = bounded::<(u64, J)>(window);
    let (out_tx, out_rx) = bounded::<(u64, Result<O>)>(window);
    let (token_tx, token_rx) = bounded::<()>(window);
    for _ in 0..window {
        token_tx.send(()).expect("fresh channel");
    }
    std::thread::scope(|s| {
        let planner = s.spawn(move || plan(&mut next_job, job_tx, token_rx));
        for _ in 0..workers {
            let (rx, tx, work) = (job_rx.clone(), out_tx.clone(), &work);
            s.spawn(move || run_jobs(rx, tx, work));
        }
        drop(job_rx);
        drop(out_tx);
        let consumed = consume(out_rx, token_tx, &mut sink);
        let planned = planner.join().expect("planner thread panicked");
        consumed.and(planned)
    })
}

fn plan<J>(
    next_job: &mut impl FnMut() -> Result<Option<J>>,
    job_tx: Sender<(u64, J)>,
    tokens: Receiver<()>,
) -> Result<()> {
    let mut seq = 0;
    loop {
        if tokens.recv().is_err() {
            return Ok(()); // the consumer stopped: its error is reported there
        }
        crate::interrupt::check()?;
        match next_job()? {
            None => return Ok(()),
            Some(job) => {
                if job_tx.send((seq, job)).is_err() {
                    return Ok(());
                }
                seq += 1;
            }
        }
    }
}

fn run_jobs<J, O>(
    rx: Receiver<(u64, J)>,
    tx: Sender<(u64, Result<O>)>,
    work: &impl Fn(J) -> Result<O>,
) {
    for (seq, job) in rx {
        let out = crate::interrupt::check().and_then(|()| work(job));
        if tx.send((seq, out)).is_err() {
            return;
        }
    }
}

fn consume<O>(
    rx: Receiver<(u64, Result<O>)>,
    tokens: Sender<()>,
    sink: &mut impl FnMut(O) -> Result<()>,
) -> Result<()> {
    let mut pending = BTreeMap::new();
    let mut next = 0u64;
    for (seq, out) in rx.iter() {
        pending.insert(seq, out);
        while let Some(out) = pending.remove(&next) {
            sink(out?)?;
            next += 1;
            let _ = tokens.send(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn results_arrive_in_order() {
        let mut n = 0u64;
        let mut got = Vec::new();
        ordered(
            4,
            8,
            || {
                n += 1;
                Ok((n <= 1000).then_some(n))
            },
            |j| {
                if j % 7 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Ok(j * 2)
            },
            |o| {
                got.push(o);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, (1..=1000).map(|j| j * 2).collect::<Vec<_>>());
    }

    #[test]
    fn first_error_stops_the_run() {
        let mut n = 0u64;
        let err = ordered(
            2,
            4,
            || {
                n += 1;
                Ok(Some(n))
            },
            |j| {
                if j == 50 {
                    Err(Error::usage("boom"))
                } else {
                    Ok(j)
                }
            },
            |_| Ok(()),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "boom");
        let err = ordered(
            2,
            4,
            || Err::<Option<u8>, _>(Error::usage("plan")),
            Ok,
            |_| Ok(()),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "plan");
    }
}
