/* hostd._slots: DigestSlots, the digest -> slot map of hostd/core/slots.py, in C.
 *
 * The native half of hostd/core/slots.py, which holds the pure-Python twin (PyDigestSlots)
 * and the contract: keys of `width` bytes to small int slots, with no Python object per key.
 * The twins give the same slot for any sequence of calls (a new slot is `capacity`, a freed
 * one is given out again last-freed first), because callers index their own columns by slot
 * (tests/test_slots.py runs them side by side); only the order of slots() differs.
 *
 * Layout, as the twin's: the keys in one store, slot s at byte s * width (here in pages of
 * ~64 KiB, so that growing it never copies what it holds); a stack of freed slots; an index
 * split in SHARDS open-addressing tables (linear probing) of uint32 entries: 0 empty,
 * GONE a removed key (a tombstone: probes go on past it), else slot + 1. A shard grows (or
 * sheds its tombstones) on its own when one more entry would fill it past two thirds, so no
 * add costs a pass over more than ~1/SHARDS of the keys. A key costs its width plus 6-12
 * bytes of index.
 *
 * The hash is this file's own (the twin uses Python's hash()): the key's bytes mixed 16 at a
 * time by 64x64->128-bit multiplies (as wyhash does), good for any keys, not only for the
 * uniformly random digests hostd gives it. Its low SHARD_BITS bits choose the shard, the
 * bits above them where probing starts. Keyed, as Python's hash() is, by secrets drawn per
 * table: keys come from manifests before their bytes are verified, and with known constants
 * a first word that zeroes a multiply (load64(p) == P1) makes the next 8 bytes vanish from
 * the hash, so that anyone could pick 2**64 keys of one hash, one probe run between them.
 *
 * Every call holds the GIL from start to end and calls no Python code once it has begun to
 * change the table; allocations come first, so a MemoryError leaves the table as it was.
 * Slot arguments are bounds-checked (IndexError); remove() of a slot that holds no key is a
 * ValueError. key() of a freed slot gives the key it held last, as the twin's does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>

#define SHARD_BITS 10
#define SHARDS (1 << SHARD_BITS)
#define MIN_SIZE 8
#define EMPTY 0u
#define GONE UINT32_MAX
#define PAGE_BYTES (1 << 16)
#define MAX_WIDTH (1 << 16)
/* As the twin's array("i") entries: slot + 1 fits a signed 32-bit int. */
#define MAX_SLOTS ((Py_ssize_t)INT32_MAX - 1)

typedef struct {
    uint32_t *idx;   /* NULL until the shard's first key */
    uint32_t size;   /* entries: 0, or a power of two >= MIN_SIZE */
    uint32_t filled; /* entries in use, tombstones included */
    uint32_t live;   /* entries holding a key */
} Shard;

typedef struct {
    PyObject_HEAD
    Py_ssize_t width;
    uint64_t seed, secret; /* the hash's keys, random per table */
    Py_ssize_t count;      /* keys held */
    Py_ssize_t capacity; /* slots ever given out */
    int page_bits;       /* slots per page: 1 << page_bits */
    unsigned char **pages;
    Py_ssize_t npages, pages_room;
    uint32_t *free; /* freed slots, a stack */
    Py_ssize_t nfree, free_room;
    Shard shards[SHARDS];
} Slots;

typedef struct {
    PyObject_HEAD
    Slots *table; /* NULL once exhausted */
    Py_ssize_t shard;
    uint32_t at;
} SlotsIter;

static PyTypeObject SlotsType;
static PyTypeObject SlotsIterType;

/* ---- the hash ------------------------------------------------------------------------------ */

#define P0 0xa0761d6478bd642fULL
#define P1 0xe7037ed1a0b428dbULL
#define P2 0x8ebc6af09c88c6e3ULL
#define P3 0x589965cc75374cc3ULL

static inline uint64_t mum(uint64_t a, uint64_t b) {
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t hash_key(const Slots *t, const unsigned char *p, size_t n) {
    uint64_t h = P0 ^ t->seed ^ n, k = P1 ^ t->secret;
    for (; n >= 16; p += 16, n -= 16)
        h = mum(load64(p) ^ k, load64(p + 8) ^ h);
    uint64_t a = 0, b = 0;
    if (n > 8) {
        a = load64(p);
        memcpy(&b, p + 8, n - 8);
    } else {
        memcpy(&a, p, n);
    }
    return mum(mum(a ^ P2 ^ t->secret, b ^ h ^ P3), h ^ k);
}

/* ---- the table ----------------------------------------------------------------------------- */

static inline unsigned char *key_at(const Slots *t, Py_ssize_t slot) {
    return t->pages[slot >> t->page_bits] +
           (size_t)(slot & (((Py_ssize_t)1 << t->page_bits) - 1)) * (size_t)t->width;
}

static inline int same(const unsigned char *a, const unsigned char *b, Py_ssize_t w) {
    if (w == 32) /* a digest: four words, no call */
        return load64(a) == load64(b) && load64(a + 8) == load64(b + 8) &&
               load64(a + 16) == load64(b + 16) && load64(a + 24) == load64(b + 24);
    return memcmp(a, b, (size_t)w) == 0;
}

static inline Shard *shard_of(Slots *t, uint64_t h) { return &t->shards[h & (SHARDS - 1)]; }

static inline uint32_t start_of(const Shard *s, uint64_t h) {
    return (uint32_t)(h >> SHARD_BITS) & (s->size - 1);
}

/* The slot holding `key` (width bytes), or -1. */
static Py_ssize_t lookup(Slots *t, const unsigned char *key) {
    uint64_t h = hash_key(t, key, (size_t)t->width);
    Shard *s = shard_of(t, h);
    if (s->idx == NULL)
        return -1;
    uint32_t mask = s->size - 1, i = start_of(s, h);
    for (;;) {
        uint32_t v = s->idx[i];
        if (v == EMPTY)
            return -1;
        if (v != GONE && same(key_at(t, v - 1), key, t->width))
            return (Py_ssize_t)v - 1;
        i = (i + 1) & mask;
    }
}

/* Rebuild shard `s`'s index without its tombstones, sized for twice its keys. */
static int rehash(Slots *t, Shard *s) {
    uint64_t size = MIN_SIZE;
    while (((uint64_t)s->live + 1) * 3 > size)
        size *= 2;
    if (size > ((uint64_t)1 << 31)) {
        PyErr_SetString(PyExc_MemoryError, "DigestSlots: a shard too big");
        return -1;
    }
    uint32_t *idx = PyMem_Calloc((size_t)size, sizeof(uint32_t));
    if (idx == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    uint32_t mask = (uint32_t)size - 1;
    for (uint32_t j = 0; j < s->size; j++) {
        uint32_t v = s->idx[j];
        if (v == EMPTY || v == GONE)
            continue;
        uint64_t h = hash_key(t, key_at(t, v - 1), (size_t)t->width);
        uint32_t i = (uint32_t)(h >> SHARD_BITS) & mask;
        while (idx[i] != EMPTY)
            i = (i + 1) & mask;
        idx[i] = v;
    }
    PyMem_Free(s->idx);
    s->idx = idx;
    s->size = (uint32_t)size;
    s->filled = s->live;
    return 0;
}

/* Where adding `key` probes: its shard (grown first if one more entry would fill it past two
 * thirds) and the first entry to look at. -1 with an exception set on failure. */
static int adding(Slots *t, const unsigned char *key, Py_ssize_t n, Shard **shard, uint32_t *at) {
    if (n != t->width) {
        PyErr_Format(PyExc_ValueError, "a key of %zd bytes, want %zd", n, t->width);
        return -1;
    }
    uint64_t h = hash_key(t, key, (size_t)n);
    Shard *s = shard_of(t, h);
    if (((uint64_t)s->filled + 1) * 3 > (uint64_t)s->size * 2 && rehash(t, s) < 0)
        return -1;
    *shard = s;
    *at = start_of(s, h);
    return 0;
}

/* Give `key` a slot at entry `i` of shard `s` (empty or a tombstone): the last freed one,
 * else a new one (== capacity). */
static Py_ssize_t claim(Slots *t, Shard *s, uint32_t i, const unsigned char *key) {
    Py_ssize_t slot;
    if (t->nfree > 0) {
        slot = t->free[--t->nfree];
    } else {
        slot = t->capacity;
        if (slot >= MAX_SLOTS) {
            PyErr_SetString(PyExc_OverflowError, "DigestSlots: no slot left (2**31 - 1)");
            return -1;
        }
        Py_ssize_t page = slot >> t->page_bits;
        if (page == t->npages) {
            if (t->npages == t->pages_room) {
                Py_ssize_t room = t->pages_room ? 2 * t->pages_room : 16;
                unsigned char **pages = PyMem_Realloc(t->pages, (size_t)room * sizeof(*pages));
                if (pages == NULL) {
                    PyErr_NoMemory();
                    return -1;
                }
                t->pages = pages;
                t->pages_room = room;
            }
            unsigned char *p = PyMem_Malloc((size_t)t->width << t->page_bits);
            if (p == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            t->pages[t->npages++] = p;
        }
        t->capacity++;
    }
    memcpy(key_at(t, slot), key, (size_t)t->width);
    if (s->idx[i] == EMPTY)
        s->filled++;
    s->idx[i] = (uint32_t)slot + 1;
    s->live++;
    t->count++;
    return slot;
}

/* ---- arguments ----------------------------------------------------------------------------- */

/* A key's bytes: a bytes object's own, else a buffer's (released by done_key). */
static int get_key(PyObject *arg, Py_buffer *view, const unsigned char **p, Py_ssize_t *n) {
    if (PyBytes_CheckExact(arg)) {
        view->obj = NULL;
        *p = (const unsigned char *)PyBytes_AS_STRING(arg);
        *n = PyBytes_GET_SIZE(arg);
        return 0;
    }
    if (PyObject_GetBuffer(arg, view, PyBUF_SIMPLE) < 0)
        return -1;
    *p = view->buf;
    *n = view->len;
    return 0;
}

static inline void done_key(Py_buffer *view) {
    if (view->obj != NULL)
        PyBuffer_Release(view);
}

/* A slot argument: an int in [0, capacity), else IndexError (TypeError if not an int). */
static int get_slot(Slots *t, PyObject *arg, Py_ssize_t *slot) {
    Py_ssize_t s = PyNumber_AsSsize_t(arg, NULL); /* clipped where it does not fit */
    if (s == -1 && PyErr_Occurred())
        return -1;
    if (s < 0 || s >= t->capacity) {
        PyErr_Format(PyExc_IndexError, "slot %S out of range (capacity %zd)", arg, t->capacity);
        return -1;
    }
    *slot = s;
    return 0;
}

/* ---- the type ------------------------------------------------------------------------------ */

static PyObject *slots_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"width", NULL};
    Py_ssize_t width = 32;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|n:DigestSlots", kwlist, &width))
        return NULL;
    if (width < 1 || width > MAX_WIDTH) {
        PyErr_Format(PyExc_ValueError, "a width of %zd bytes, want 1 to %d", width, MAX_WIDTH);
        return NULL;
    }
    Slots *t = (Slots *)type->tp_alloc(type, 0); /* zeroed: every shard empty */
    if (t == NULL)
        return NULL;
    t->width = width;
    uint64_t keys[2];
    if (getrandom(keys, sizeof keys, 0) != (ssize_t)sizeof keys) {
        Py_DECREF(t);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    t->seed = keys[0];
    t->secret = keys[1];
    int bits = 0;
    while (((Py_ssize_t)2 << bits) * width <= PAGE_BYTES)
        bits++;
    t->page_bits = bits;
    return (PyObject *)t;
}

static void slots_dealloc(Slots *t) {
    for (int i = 0; i < SHARDS; i++)
        PyMem_Free(t->shards[i].idx);
    for (Py_ssize_t i = 0; i < t->npages; i++)
        PyMem_Free(t->pages[i]);
    PyMem_Free(t->pages);
    PyMem_Free(t->free);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *slots_repr(Slots *t) {
    return PyUnicode_FromFormat("DigestSlots(%zd keys, %zd slots)", t->count, t->capacity);
}

static Py_ssize_t slots_len(Slots *t) { return t->count; }

static PyObject *slots_find(Slots *t, PyObject *arg) {
    Py_buffer view;
    const unsigned char *p;
    Py_ssize_t n;
    if (get_key(arg, &view, &p, &n) < 0)
        return NULL;
    Py_ssize_t slot = n == t->width ? lookup(t, p) : -1; /* as the twin: no such key */
    done_key(&view);
    return PyLong_FromSsize_t(slot);
}

static PyObject *slots_add(Slots *t, PyObject *arg) {
    Py_buffer view;
    const unsigned char *p;
    Py_ssize_t n, slot = -1;
    Shard *s;
    uint32_t i;
    if (get_key(arg, &view, &p, &n) < 0)
        return NULL;
    if (adding(t, p, n, &s, &i) == 0) {
        uint32_t mask = s->size - 1;
        while (s->idx[i] != EMPTY && s->idx[i] != GONE)
            i = (i + 1) & mask;
        slot = claim(t, s, i, p);
    }
    done_key(&view);
    return slot < 0 ? NULL : PyLong_FromSsize_t(slot);
}

static PyObject *slots_put(Slots *t, PyObject *arg) {
    Py_buffer view;
    const unsigned char *p;
    Py_ssize_t n, slot = -1;
    Shard *s;
    uint32_t i;
    if (get_key(arg, &view, &p, &n) < 0)
        return NULL;
    if (adding(t, p, n, &s, &i) == 0) {
        uint32_t mask = s->size - 1, v;
        int64_t gone = -1; /* the first tombstone on the way: where an absent key goes */
        while ((v = s->idx[i]) != EMPTY) {
            if (v != GONE) {
                if (same(key_at(t, v - 1), p, n)) {
                    slot = (Py_ssize_t)v - 1;
                    break;
                }
            } else if (gone < 0) {
                gone = i;
            }
            i = (i + 1) & mask;
        }
        if (slot < 0)
            slot = claim(t, s, gone < 0 ? i : (uint32_t)gone, p);
    }
    done_key(&view);
    return slot < 0 ? NULL : PyLong_FromSsize_t(slot);
}

static PyObject *slots_remove(Slots *t, PyObject *arg) {
    Py_ssize_t slot;
    if (get_slot(t, arg, &slot) < 0)
        return NULL;
    uint64_t h = hash_key(t, key_at(t, slot), (size_t)t->width);
    Shard *s = shard_of(t, h);
    uint32_t want = (uint32_t)slot + 1, i = 0, v = EMPTY;
    if (s->idx != NULL) {
        uint32_t mask = s->size - 1;
        /* A held slot's entry is on its key's probe path, before any empty entry. */
        for (i = start_of(s, h); (v = s->idx[i]) != want && v != EMPTY; i = (i + 1) & mask)
            ;
    }
    if (v != want) {
        PyErr_Format(PyExc_ValueError, "slot %zd holds no key", slot);
        return NULL;
    }
    if (t->nfree == t->free_room) {
        Py_ssize_t room = t->free_room ? 2 * t->free_room : 64;
        uint32_t *free = PyMem_Realloc(t->free, (size_t)room * sizeof(*free));
        if (free == NULL)
            return PyErr_NoMemory();
        t->free = free;
        t->free_room = room;
    }
    s->idx[i] = GONE;
    s->live--;
    t->count--;
    t->free[t->nfree++] = (uint32_t)slot;
    Py_RETURN_NONE;
}

static PyObject *slots_key(Slots *t, PyObject *arg) {
    Py_ssize_t slot;
    if (get_slot(t, arg, &slot) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)key_at(t, slot), t->width);
}

static PyObject *slots_slots(Slots *t, PyObject *Py_UNUSED(ignored)) {
    SlotsIter *it = PyObject_New(SlotsIter, &SlotsIterType);
    if (it == NULL)
        return NULL;
    Py_INCREF(t);
    it->table = t;
    it->shard = 0;
    it->at = 0;
    return (PyObject *)it;
}

static size_t heap_bytes(const Slots *t) {
    size_t n = (size_t)t->npages * ((size_t)t->width << t->page_bits) +
               (size_t)t->pages_room * sizeof(*t->pages) +
               (size_t)t->free_room * sizeof(*t->free);
    for (int i = 0; i < SHARDS; i++)
        n += (size_t)t->shards[i].size * sizeof(uint32_t);
    return n;
}

static PyObject *slots_nbytes(Slots *t, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSize_t(heap_bytes(t) + sizeof(t->shards));
}

static PyObject *slots_sizeof(Slots *t, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSize_t(heap_bytes(t) + sizeof(*t));
}

static PyMethodDef slots_methods[] = {
    {"find", (PyCFunction)slots_find, METH_O, "find(key) -> slot, or -1 where key is absent"},
    {"add", (PyCFunction)slots_add, METH_O,
     "add(key) -> slot\n\nGive an absent key a slot: the last freed one, else a new one "
     "(== capacity). ValueError for a key of another width."},
    {"put", (PyCFunction)slots_put, METH_O,
     "put(key) -> slot\n\nThe slot of key: its own if present, else a new one as add gives."},
    {"remove", (PyCFunction)slots_remove, METH_O,
     "remove(slot)\n\nFree slot and forget its key (ValueError: it holds none)."},
    {"key", (PyCFunction)slots_key, METH_O,
     "key(slot) -> bytes\n\nThe key at slot (of a freed slot: the last it held)."},
    {"slots", (PyCFunction)slots_slots, METH_NOARGS,
     "slots() -> iterator of every slot holding a key, in no useful order"},
    {"nbytes", (PyCFunction)slots_nbytes, METH_NOARGS,
     "nbytes() -> what the structure holds in buffers"},
    {"__sizeof__", (PyCFunction)slots_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef slots_members[] = {
    {"width", T_PYSSIZET, offsetof(Slots, width), READONLY, "bytes per key"},
    {"count", T_PYSSIZET, offsetof(Slots, count), READONLY, "keys held (len)"},
    {"capacity", T_PYSSIZET, offsetof(Slots, capacity), READONLY,
     "slots ever given out (free ones included): how long the caller's columns are"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods slots_as_sequence = {
    .sq_length = (lenfunc)slots_len,
};

static PyTypeObject SlotsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostd._slots.DigestSlots",
    .tp_doc = "DigestSlots(width=32)\n\nKeys of `width` bytes to slots (see "
              "hostd/core/slots.py).",
    .tp_basicsize = sizeof(Slots),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = slots_new,
    .tp_dealloc = (destructor)slots_dealloc,
    .tp_repr = (reprfunc)slots_repr,
    .tp_as_sequence = &slots_as_sequence,
    .tp_methods = slots_methods,
    .tp_members = slots_members,
};

/* ---- slots() ------------------------------------------------------------------------------- */

/* Reads the shards as they are at each step: a table changed while it is iterated gives
 * no error and reads nothing out of bounds (a slot may be missed or seen twice). */
static PyObject *iter_next(SlotsIter *it) {
    Slots *t = it->table;
    if (t == NULL)
        return NULL;
    for (; it->shard < SHARDS; it->shard++, it->at = 0) {
        Shard *s = &t->shards[it->shard];
        while (it->at < s->size) {
            uint32_t v = s->idx[it->at++];
            if (v != EMPTY && v != GONE)
                return PyLong_FromSsize_t((Py_ssize_t)v - 1);
        }
    }
    it->table = NULL;
    Py_DECREF(t);
    return NULL;
}

static void iter_dealloc(SlotsIter *it) {
    Py_XDECREF(it->table);
    PyObject_Free(it);
}

static PyTypeObject SlotsIterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hostd._slots.SlotsIterator",
    .tp_basicsize = sizeof(SlotsIter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)iter_dealloc,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)iter_next,
};

/* ---- the module ---------------------------------------------------------------------------- */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "hostd._slots",
    .m_doc = "DigestSlots in C (the twin is hostd/core/slots.py's PyDigestSlots).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__slots(void) {
    if (PyType_Ready(&SlotsType) < 0 || PyType_Ready(&SlotsIterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddType(m, &SlotsType) < 0 ||
        PyModule_AddIntConstant(m, "SHARD_BITS", SHARD_BITS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_WIDTH", MAX_WIDTH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
