//! Data-parallel training's collective: each rank (one process, one device) computes the
//! gradient of its share of a step's rows, and every rank gets the sum over all ranks
//! before the optimizer step, so that every replica takes the same step as one process
//! over all the rows would (the global batch and the data order are one process's).
//!
//! [`Rendezvous`] reads who is who from the launcher's environment: torchrun's (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or SLURM's (`SLURM_PROCID`,
//! `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR` and `MASTER_PORT` set by the batch
//! script, as for torch under `srun`). [`TcpCollective`] sums over TCP through rank 0, in
//! rank order: the same bits on every rank and on every run. It carries host memory (a
//! GPU's gradients go through the host); on GPUs `super::nccl::NcclCollective` sums the
//! gradients between the devices and keeps TCP for the step's few scalars.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{ModelError, Result};

/// The sum of every rank's values, on every rank.
pub trait Collective: Send {
    /// This process's rank, 0..world.
    fn rank(&self) -> usize;
    /// How many ranks take part.
    fn world(&self) -> usize;
    /// Replaces `values` on every rank with the element-wise sum of every rank's `values`
    /// (each rank passes as many), added in rank order.
    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()>;

    /// Replaces each tensor on every rank with its sum over the ranks, on the tensors'
    /// device; `false` where this collective sums through the host only (the caller then
    /// uses [`Collective::all_reduce_sum`]).
    fn all_reduce_tensors(&mut self, _tensors: &mut [candle_core::Tensor]) -> Result<bool> {
        Ok(false)
    }
}

/// Rank 0's `bytes` on every rank (the others pass as many, any values), through the sum:
/// rank 0 adds its bytes, the others zeros. How NCCL's id reaches the ranks.
pub fn from_rank_zero(collective: &mut dyn Collective, bytes: &[u8]) -> Result<Vec<u8>> {
    let leader = collective.rank() == 0;
    let mut values: Vec<f64> = bytes
        .iter()
        .map(|&b| if leader { b as f64 } else { 0.0 })
        .collect();
    collective.all_reduce_sum(&mut values)?;
    Ok(values.iter().map(|&v| v as u8).collect())
}

/// One process alone: the sum is its own values.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// Who this process is among the ranks of a data-parallel run, and where rank 0 listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    /// The rank's index on its host: the GPU it takes (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Rendezvous {
    /// From the environment variables `var` reads: torchrun's first, else SLURM's; `None`
    /// when neither names more than one rank.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let (source, rank, world, local) = if var("WORLD_SIZE").is_some() {
            ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK")
        } else if var("SLURM_NTASKS").is_some() {
            ("SLURM", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        } else {
            return Ok(None);
        };
        let number = |name: &str, default: Option<usize>| -> Result<usize> {
            match var(name) {
                Some(v) => v.trim().parse().map_err(|_| {
                    ModelError::Config(format!("{source} rendezvous: {name}={v} is not a count"))
                }),
                None => default.ok_or_else(|| {
                    ModelError::Config(format!("{source} rendezvous: {name} is not set"))
                }),
            }
        };
        let world = number(world, None)?;
        if world <= 1 {
            return Ok(None);
        }
        let rank = number(rank, None)?;
        if rank >= world {
            return Err(ModelError::Config(format!(
                "{source} rendezvous: rank {rank} of a world of {world}"
            )));
        }
        let local_rank = number(local, Some(0))?;
        let master_addr = var("MASTER_ADDR").ok_or_else(|| {
            ModelError::Config(format!(
                "{source} rendezvous: MASTER_ADDR is not set (rank 0's host)"
            ))
        })?;
        let port = var("MASTER_PORT").ok_or_else(|| {
            ModelError::Config(format!(
                "{source} rendezvous: MASTER_PORT is not set (the port rank 0 listens on)"
            ))
        })?;
        let master_port = port.trim().parse().map_err(|_| {
            ModelError::Config(format!(
                "{source} rendezvous: MASTER_PORT={port} is not a port"
            ))
        })?;
        Ok(Some(Self {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
        }))
    }

    /// Joins the other ranks: rank 0 listens on MASTER_PORT and waits for the others to
    /// connect; each other rank connects to MASTER_ADDR:MASTER_PORT, retrying until
    /// `timeout` has passed (rank 0 may start later). Every rank must agree on the world.
    pub fn connect(&self, timeout: Duration) -> Result<TcpCollective> {
        let fail = |what: String| ModelError::Config(format!("rendezvous: {what}"));
        let deadline = Instant::now() + timeout;
        if self.rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", self.master_port)).map_err(|e| {
                fail(format!(
                    "rank 0 cannot listen on port {}: {e}",
                    self.master_port
                ))
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| fail(e.to_string()))?;
            let mut peers: Vec<Option<TcpStream>> = (1..self.world).map(|_| None).collect();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream
                            .set_nonblocking(false)
                            .map_err(|e| fail(e.to_string()))?;
                        let (rank, world) = read_hello(&mut stream)?;
                        if world != self.world || rank == 0 || rank >= self.world {
                            return Err(fail(format!(
                                "a rank {rank} of a world of {world} joined a world of {}",
                                self.world
                            )));
                        }
                        if peers[rank - 1].replace(stream).is_some() {
                            return Err(fail(format!("rank {rank} joined twice")));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = peers
                                .iter()
                                .enumerate()
                                .filter(|(_, p)| p.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            return Err(fail(format!(
                                "ranks {} did not join within {} s",
                                missing.join(", "),
                                timeout.as_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(fail(format!("accept: {e}"))),
                }
            }
            Ok(TcpCollective {
                rank: 0,
                world: self.world,
                links: peers.into_iter().flatten().collect(),
            })
        } else {
            let target = format!("{}:{}", self.master_addr, self.master_port);
            let stream = loop {
                let attempt = target
                    .to_socket_addrs()
                    .map_err(|e| fail(format!("MASTER_ADDR {target}: {e}")))?
                    .find_map(|addr| {
                        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()
                    });
                match attempt {
                    Some(stream) => break stream,
                    None if Instant::now() > deadline => {
                        return Err(fail(format!(
                            "rank {} could not reach rank 0 at {target} within {} s",
                            self.rank,
                            timeout.as_secs()
                        )))
                    }
                    None => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            let mut stream = stream;
            stream.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
            let mut hello = Vec::with_capacity(16);
            hello.extend_from_slice(&(self.rank as u64).to_le_bytes());
            hello.extend_from_slice(&(self.world as u64).to_le_bytes());
            stream
                .write_all(&hello)
                .map_err(|e| fail(format!("rank {}: {e}", self.rank)))?;
            Ok(TcpCollective {
                rank: self.rank,
                world: self.world,
                links: vec![stream],
            })
        }
    }
}

fn read_hello(stream: &mut TcpStream) -> Result<(usize, usize)> {
    let mut hello = [0u8; 16];
    stream
        .read_exact(&mut hello)
        .map_err(|e| ModelError::Config(format!("rendezvous: a joining rank: {e}")))?;
    let rank = u64::from_le_bytes(hello[..8].try_into().expect("8 bytes")) as usize;
    let world = u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) as usize;
    Ok((rank, world))
}

/// Sums through rank 0 over TCP: every other rank sends its values, rank 0 adds them to
/// its own in rank order and sends the sum back. A rank that dies ends the others' next
/// sum with an error naming it (its socket closes), so that a launcher restarts them all
/// from the last checkpoint.
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: the streams of ranks 1..world, in order; any other rank: rank 0's.
    links: Vec<TcpStream>,
}

impl TcpCollective {
    fn send(stream: &mut TcpStream, values: &[f64], peer: usize) -> Result<()> {
        let mut bytes = Vec::with_capacity(8 + values.len() * 8);
        bytes.extend_from_slice(&(values.len() as u64).to_le_bytes());
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        stream
            .write_all(&bytes)
            .map_err(|e| ModelError::Config(format!("all-reduce: sending to rank {peer}: {e}")))
    }

    fn receive(stream: &mut TcpStream, into: &mut [f64], peer: usize, add: bool) -> Result<()> {
        let lost = |e: std::io::Error| {
            ModelError::Config(format!("all-reduce: rank {peer} is gone or failed: {e}"))
        };
        let mut len = [0u8; 8];
        stream.read_exact(&mut len).map_err(lost)?;
        let len = u64::from_le_bytes(len) as usize;
        if len != into.len() {
            return Err(ModelError::Config(format!(
                "all-reduce: rank {peer} sent {len} values where this rank has {}",
                into.len()
            )));
        }
        let mut bytes = vec![0u8; len * 8];
        stream.read_exact(&mut bytes).map_err(lost)?;
        for (slot, chunk) in into.iter_mut().zip(bytes.chunks_exact(8)) {
            let v = f64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            *slot = if add { *slot + v } else { v };
        }
        Ok(())
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()> {
        if self.rank == 0 {
            for (i, link) in self.links.iter_mut().enumerate() {
                Self::receive(link, values, i + 1, true)?;
            }
            for (i, link) in self.links.iter_mut().enumerate() {
                Self::send(link, values, i + 1)?;
            }
        } else {
            let link = &mut self.links[0];
            Self::send(link, values, 0)?;
            Self::receive(link, values, 0, false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn rendezvous_reads_torchrun_then_slurm() {
        assert_eq!(Rendezvous::from_env(env(&[])).unwrap(), None);
        assert_eq!(
            Rendezvous::from_env(env(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(),
            None
        );
        let torchrun = Rendezvous::from_env(env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29500"),
            ("SLURM_NTASKS", "8"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            torchrun,
            Rendezvous {
                rank: 3,
                world: 4,
                local_rank: 1,
                master_addr: "node7".into(),
                master_port: 29500
            }
        );
        let slurm = Rendezvous::from_env(env(&[
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "12345"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((slurm.rank, slurm.world, slurm.local_rank), (1, 2, 1));
        for (pairs, says) in [
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "2"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "1"),
                ],
                "rank 2 of a world of 2",
            ),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")],
                "MASTER_ADDR is not set",
            ),
            (
                vec![("WORLD_SIZE", "two"), ("RANK", "0")],
                "WORLD_SIZE=two is not a count",
            ),
            (
                vec![
                    ("SLURM_NTASKS", "2"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "1"),
                ],
                "SLURM rendezvous: SLURM_PROCID is not set",
            ),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "1"),
                    ("MASTER_ADDR", "a"),
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT=99999 is not a port",
            ),
        ] {
            let e = Rendezvous::from_env(env(&pairs)).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    /// A free port on this host (bound, then released).
    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Rank `rank` of `world` on this host, rank 0 listening on `port`.
    fn join_local(rank: usize, world: usize, port: u16) -> TcpCollective {
        Rendezvous {
            rank,
            world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
        .connect(Duration::from_secs(20))
        .unwrap()
    }

    /// Three ranks in threads: every rank ends with the same sum, added in rank order; a
    /// rank that goes away fails the others' next sum, naming it.
    #[test]
    fn three_ranks_sum_in_rank_order_and_a_lost_rank_is_an_error() {
        let port = free_port();
        let world = 3;
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                std::thread::spawn(move || {
                    let mut c = join_local(rank, world, port);
                    // 0.1 + 1e16 - 1e16 in rank order is 0, in another order 0.1.
                    let mut values = vec![[0.1, 1e16, -1e16][rank], rank as f64];
                    c.all_reduce_sum(&mut values).unwrap();
                    if rank == 2 {
                        return (values, None);
                    }
                    // Rank 2 has returned and dropped its link: the next sum fails.
                    let e = c.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
                    (values, Some(e))
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let (values, error) = h.join().unwrap();
            assert_eq!(values, vec![(0.1 + 1e16) - 1e16, 3.0], "rank {rank}");
            if rank == 0 {
                assert!(error.unwrap().contains("rank 2 is gone"), "rank 0");
            } else if rank == 1 {
                assert!(error.unwrap().contains("rank 0"), "rank 1");
            }
        }
    }

    /// Every byte value (0-255) of rank 0 reaches the other ranks as it is, whatever they
    /// held: how NCCL's 128-byte id is handed out.
    #[test]
    fn rank_zeros_bytes_reach_every_rank() {
        let port = free_port();
        let world = 3;
        let id: Vec<u8> = (0..=255u8).rev().collect();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let id = id.clone();
                std::thread::spawn(move || {
                    let mut c = join_local(rank, world, port);
                    let mine = if rank == 0 { id } else { vec![7u8; 256] };
                    from_rank_zero(&mut c, &mine).unwrap()
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), id, "rank {rank}");
        }
    }
}
