//! Doubly linked lists threaded through one slab of nodes by index.
//!
//! Every policy keeps its queues (LRU order, FIFOs, ghost lists) as [`List`]s
//! over a shared [`Slab`], plus one `HashMap<K, u32>` from key to node index.
//! Moving a node between lists is a few index writes; freed nodes are chained
//! into a free list and reused, so steady-state operation allocates nothing.
//!
//! A list's *head* is its newest (most recently used / inserted) end and its
//! *tail* its oldest end, where eviction looks first.

/// "No node": the end of a list or of the free chain.
pub(crate) const NIL: u32 = u32::MAX;

/// One slot of the slab.
#[derive(Debug, Clone, Copy)]
struct Node<K> {
    key: K,
    prev: u32,
    next: u32,
    /// Which of the owning policy's lists holds the node (policy-defined).
    list: u8,
    /// Small per-node counter for the policy's use (e.g. S3-FIFO frequency).
    freq: u8,
}

/// Head, tail and length of one list. The nodes live in a [`Slab`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct List {
    head: u32,
    tail: u32,
    len: usize,
}

impl List {
    pub(crate) const fn new() -> List {
        List { head: NIL, tail: NIL, len: 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The oldest node, or [`NIL`].
    pub(crate) fn tail(&self) -> u32 {
        self.tail
    }
}

/// Storage for the nodes of several [`List`]s.
#[derive(Debug)]
pub(crate) struct Slab<K> {
    nodes: Vec<Node<K>>,
    /// First free slot, chained through `next`.
    free: u32,
}

impl<K: Copy> Slab<K> {
    pub(crate) const fn new() -> Slab<K> {
        Slab { nodes: Vec::new(), free: NIL }
    }

    /// Takes a slot for `key`, tagged with `list` and a zero counter. The slot
    /// is not linked into any list yet.
    pub(crate) fn alloc(&mut self, key: K, list: u8) -> u32 {
        let node = Node { key, prev: NIL, next: NIL, list, freq: 0 };
        if self.free != NIL {
            let idx = self.free;
            self.free = self.nodes[idx as usize].next;
            self.nodes[idx as usize] = node;
            return idx;
        }
        // u32::MAX is NIL; four billion live entries would need far more memory
        // than any node has, so running out of indices is a broken invariant.
        let idx = u32::try_from(self.nodes.len()).ok().filter(|&i| i != NIL).expect("eviction policy slab overflow");
        self.nodes.push(node);
        idx
    }

    /// Returns an unlinked slot to the free chain.
    pub(crate) fn release(&mut self, idx: u32) {
        let node = &mut self.nodes[idx as usize];
        debug_assert!(node.prev == NIL && node.next == NIL, "released a linked node");
        node.next = self.free;
        self.free = idx;
    }

    pub(crate) fn key(&self, idx: u32) -> K {
        self.nodes[idx as usize].key
    }

    /// The list tag given at [`Slab::alloc`] or [`Slab::set_list`].
    pub(crate) fn list_of(&self, idx: u32) -> u8 {
        self.nodes[idx as usize].list
    }

    pub(crate) fn set_list(&mut self, idx: u32, list: u8) {
        self.nodes[idx as usize].list = list;
    }

    pub(crate) fn freq(&self, idx: u32) -> u8 {
        self.nodes[idx as usize].freq
    }

    pub(crate) fn set_freq(&mut self, idx: u32, freq: u8) {
        self.nodes[idx as usize].freq = freq;
    }

    /// The next newer node of the same list, or [`NIL`] at its head.
    pub(crate) fn newer(&self, idx: u32) -> u32 {
        self.nodes[idx as usize].prev
    }

    /// Links the unlinked node `idx` in at the head (newest end) of `list`.
    pub(crate) fn push_head(&mut self, list: &mut List, idx: u32) {
        let old_head = list.head;
        {
            let node = &mut self.nodes[idx as usize];
            debug_assert!(node.prev == NIL && node.next == NIL, "pushed a linked node");
            node.next = old_head;
        }
        if old_head == NIL {
            list.tail = idx;
        } else {
            self.nodes[old_head as usize].prev = idx;
        }
        list.head = idx;
        list.len += 1;
    }

    /// Unlinks node `idx`, which must be in `list`.
    pub(crate) fn unlink(&mut self, list: &mut List, idx: u32) {
        let Node { prev, next, .. } = self.nodes[idx as usize];
        if prev == NIL {
            debug_assert_eq!(list.head, idx, "node is not in this list");
            list.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            debug_assert_eq!(list.tail, idx, "node is not in this list");
            list.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        let node = &mut self.nodes[idx as usize];
        node.prev = NIL;
        node.next = NIL;
        list.len -= 1;
    }

    /// Moves node `idx` from `from` to the head of `to` (which may be the same list).
    pub(crate) fn move_to_head(&mut self, from: &mut List, to: &mut List, idx: u32) {
        self.unlink(from, idx);
        self.push_head(to, idx);
    }

    /// Moves node `idx` to the head of the list it is already in.
    pub(crate) fn refresh(&mut self, list: &mut List, idx: u32) {
        if list.head != idx {
            self.unlink(list, idx);
            self.push_head(list, idx);
        }
    }

    /// Keys of `list` from head (newest) to tail (oldest); for tests and debugging.
    #[cfg(test)]
    pub(crate) fn keys(&self, list: &List) -> Vec<K> {
        let mut out = Vec::with_capacity(list.len);
        let mut cur = list.head;
        while cur != NIL {
            out.push(self.key(cur));
            cur = self.nodes[cur as usize].next;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_share_a_slab_and_reuse_slots() {
        let mut slab = Slab::new();
        let (mut a, mut b) = (List::new(), List::new());
        let ids: Vec<u32> = (0..4).map(|k| slab.alloc(k, 0)).collect();
        for &i in &ids {
            slab.push_head(&mut a, i);
        }
        assert_eq!(slab.keys(&a), vec![3, 2, 1, 0]);
        assert_eq!(slab.key(a.tail()), 0);
        slab.move_to_head(&mut a, &mut b, ids[1]);
        slab.refresh(&mut a, ids[0]);
        assert_eq!(slab.keys(&a), vec![0, 3, 2]);
        assert_eq!(slab.keys(&b), vec![1]);
        assert_eq!((a.len(), b.len()), (3, 1));
        assert_eq!(slab.newer(ids[2]), ids[3]);
        slab.unlink(&mut b, ids[1]);
        assert!(b.is_empty());
        slab.release(ids[1]);
        assert_eq!(slab.alloc(9, 1), ids[1], "freed slot is reused");
        assert_eq!(slab.list_of(ids[1]), 1);
        assert_eq!(slab.freq(ids[1]), 0);
    }
}
