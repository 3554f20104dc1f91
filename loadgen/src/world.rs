//! The population a scenario describes: users, their devices, and who talks to whom.
//! Pure and deterministic from the scenario (and the run id that keeps runs apart).

use chatproof_server::domain::direct_conv_id;

use crate::scenario::Scenario;

/// One conversation of the population.
#[derive(Debug, Clone)]
pub struct Conv {
    /// Its id.
    pub id: String,
    /// Member user indexes; the first is the group owner.
    pub members: Vec<u32>,
    /// True for a group.
    pub group: bool,
}

/// Users, devices and conversations of one run.
#[derive(Debug, Clone)]
pub struct World {
    run_id: String,
    users: u32,
    devices_per_user: u32,
    group_size: u32,
    /// Every conversation; directs first (index `user / 2`), then groups.
    pub convs: Vec<Conv>,
}

/// A small deterministic mixer (SplitMix64), so every choice follows from the seed.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl World {
    /// Lays out the population; `run_id` prefixes user and group ids.
    pub fn new(scenario: &Scenario, run_id: &str) -> Self {
        let p = &scenario.population;
        let mut world = Self {
            run_id: run_id.to_owned(),
            users: p.users,
            devices_per_user: p.devices_per_user,
            group_size: p.group_size,
            convs: Vec::new(),
        };
        for a in (0..p.users).step_by(2) {
            let id = direct_conv_id(&world.user_id(a), &world.user_id(a + 1));
            world.convs.push(Conv {
                id,
                members: vec![a, a + 1],
                group: false,
            });
        }
        for (k, start) in (0..p.users).step_by(p.group_size as usize).enumerate() {
            let members: Vec<u32> = (start..(start + p.group_size).min(p.users)).collect();
            if members.len() < 2 {
                continue; // A lone leftover user has its 1:1 chat only.
            }
            world.convs.push(Conv {
                id: format!("g:{run_id}-{k}"),
                members,
                group: true,
            });
        }
        world
    }

    /// The protocol id of user `u`.
    pub fn user_id(&self, u: u32) -> String {
        format!("{}-u{u}", self.run_id)
    }

    /// The protocol id of device `d` of any user.
    pub fn device_id(d: u32) -> String {
        format!("d{d}")
    }

    /// Devices of each user.
    pub fn devices_per_user(&self) -> u32 {
        self.devices_per_user
    }

    /// Index in `convs` of user `u`'s 1:1 conversation.
    pub fn direct_of(&self, u: u32) -> usize {
        (u / 2) as usize
    }

    /// Index in `convs` of user `u`'s group, if it has one.
    pub fn group_of(&self, u: u32) -> Option<usize> {
        let index = self.users.div_ceil(2) as usize + (u / self.group_size) as usize;
        self.convs
            .get(index)
            .filter(|c| c.group && c.members.contains(&u))
            .map(|_| index)
    }

    /// The users driven by driver `driver` of `drivers`, among `users`.
    pub fn users_of_driver(users: &[u32], driver: u32, drivers: u32) -> Vec<u32> {
        users
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 % drivers == driver)
            .map(|(_, u)| *u)
            .collect()
    }

    /// The users worker `worker` of `workers` drives: whole groups (and so whole 1:1
    /// pairs, when the group size is even), so every conversation of a user stays inside
    /// one worker and each worker checks its deliveries completely.
    pub fn users_of_worker(&self, worker: u32, workers: u32) -> Vec<u32> {
        (0..self.users)
            .filter(|u| (u / self.group_size) % workers == worker)
            .collect()
    }

    /// All users.
    pub fn all_users(&self) -> Vec<u32> {
        (0..self.users).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(users: u32, group_size: u32) -> Scenario {
        let text = format!(
            "name='t'\n[population]\nusers={users}\ngroup_size={group_size}\n[load]\nduration_secs=1\nmessages_per_sec=1\ngroup_share=0.5\ndrivers=1\n"
        );
        toml::from_str(&text).unwrap()
    }

    /// Every user has one 1:1 partner and at most one group; drivers partition users.
    #[test]
    fn layout_is_complete_and_partitioned() {
        let world = World::new(&scenario(10, 4), "r");
        assert_eq!(world.convs.iter().filter(|c| !c.group).count(), 5);
        assert_eq!(
            world
                .convs
                .iter()
                .filter(|c| c.group)
                .map(|c| c.members.len())
                .collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        for u in 0..10 {
            assert!(world.convs[world.direct_of(u)].members.contains(&u));
            assert!(world.convs[world.group_of(u).unwrap()].members.contains(&u));
        }
        let mut all: Vec<u32> = (0..3)
            .flat_map(|d| World::users_of_driver(&world.all_users(), d, 3))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        // Workers get whole groups, so a user's conversations never cross workers.
        let w0 = world.users_of_worker(0, 2);
        let w1 = world.users_of_worker(1, 2);
        assert_eq!(w0.len() + w1.len(), 10);
        for c in &world.convs {
            let in_w0 = c.members.iter().filter(|u| w0.contains(u)).count();
            assert!(
                in_w0 == 0 || in_w0 == c.members.len(),
                "{} straddles workers",
                c.id
            );
        }
        assert_eq!(world.convs[0].id, "d:r-u0:r-u1");
    }

    /// `--part p/P --workers n`: worker i drives share p + P*i of P*n, and those shares
    /// split part p exactly.
    #[test]
    fn workers_of_a_part_split_the_part() {
        let world = World::new(&scenario(48, 4), "r");
        let (parts, workers) = (2, 3);
        for part in 0..parts {
            let mut split: Vec<u32> = (0..workers)
                .flat_map(|i| world.users_of_worker(part + parts * i, parts * workers))
                .collect();
            split.sort_unstable();
            assert_eq!(split, world.users_of_worker(part, parts));
            assert!(!split.is_empty());
        }
    }
}
