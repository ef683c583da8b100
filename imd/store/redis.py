"""The Redis store: the whole key schema of imd lives in this module.

Keys (all under the ``imd:`` prefix):

    nextid                    counter shared by users and groups (first id 10001)
    msgid                     message id counter
    u:<id>                    hash  account, name, avatar, verifier, created
    vl:<id>                   hash  node key id -> a keyed hash of a login that node has just
                              verified (imd/accounts.py), expires; dropped whenever the
                              user's verifier or disabled flag is written
    acct:<account>            string -> user id; <account> is the name folded to ASCII lower
                              case (names that differ only in case are one account; the
                              user hash keeps the form it was created with).  Data from
                              before folding also has keys in the created form; start-up
                              adds the folded key for those once (acctfold marks it done)
    acctfold                  string, set once every account has its folded acct: key
    users                     set of user ids
    name:<name>               set of user ids with that display name
    fr:<uid>                  hash  friend id -> the alias the user gave that friend
    frq:<uid>                 hash  requester id -> JSON {name, note}: pending friend requests
    hc:<uid>                  hash  conversation -> last message id the user cleared
    xc:<gid>                  hash  a xuanxuan chat's settings (type, admins, committers,
                              subject, created/edited by/date, group: its hub group id)
    xg:<group id>             string -> the xuanxuan gid of a hub group made by xuanxuan
    xu:<uid>                  hash  chat gid -> JSON of the user's flags (star, hide, mute)
    xo:<uid>                  set of one-to-one chat gids the user has
    system                    string -> id of the group that is xuanxuan's system chat
    public                    set of the ids of public groups
    fileid                    counter of xuanxuan file ids
    xfile:<id>                hash  an uploaded file: gid, title, size, addedBy, date, name
    xfiles:<gid>              list of the file ids of a chat
    th:<sha256 hex of token>  string -> user id, expires.  Only the hash of a token (a login
                              token, a webim cookie, a xuanxuan sid) is stored; the token
                              itself goes only to its client.  Keys of the old clear form
                              ``tok:<token>`` are deleted once per data set (``tokens``).
    tokens                    string "hashed": the clear ``tok:`` keys have been deleted
    g:<gid>                   hash  creator, name, notice, snap, created
    gm:<gid>                  set of member ids
    gmv:<gid>                 counter, raised with every change of gm:<gid> (by the scripts
                              that change it), so that a node may keep a big group's members
                              (the system chat's: every user) until it moves
    ug:<uid>                  set of group ids the user is a member of
    h:<conversation>          list of message JSON, oldest first, capped
    q:<uid>                   list of message JSON waiting for the user's next login, capped
    loc:<uid>                 set of node ids holding a live session of the user
    nu:<node>                 set of user ids with a live session on the node (what a
                              survivor announces offline when the node dies)
    nodes                     set of node ids not yet cleaned up after they stopped or died
    alive:<node>              string, expires unless the node refreshes it
    chan:<node>               pub/sub channel of one node: "<uids>|<message JSON>" deliveries
                              and "!<uids>|<event JSON>" notices to its sessions
    presence                  pub/sub channel every node hears: "<node>|<event JSON>", a
                              presence change for the sessions that watch every user
    ns:<node>                 hash  protocol -> sessions on the node (its admin endpoint
                              refreshes it; expires when the node stops doing so)
    admintok                  set of the SHA-256 hex digests of admin API tokens
    sysuser                   string -> id of the user system messages come from

A user hash with ``disabled`` = "1" is a disabled user: no password or token of theirs
logs in.

A message send is one round trip: the ``post`` script assigns id and timestamp, appends to
history, publishes to every other node with a live session of a recipient, and queues the
message for recipients who have none.  A PUBLISH that reaches no subscriber (the node is gone)
counts as "not live", so a message is queued rather than lost.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any, Callable, Iterable

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from imd.metrics import histogram
from imd.model import PROFILE_FIELDS, Event, Group, Message, User, compact_json

log = Logger()
PREFIX = "imd:"
REDIS_RTT = histogram("imd_redis_roundtrip_seconds",
                      "Round-trip time of a PING to Redis (sampled by the admin endpoint)",
                      buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1,
                               .25, .5, 1, 2.5))
FIRST_ID = 10001
MAX_BATCH = 256  # messages per post script call
BIG_GROUP = 256  # members from which a node keeps a group's member list (get_group)


class StoreError(Exception):
    """A store operation failed in a way the caller should report to the client."""


class AccountTaken(StoreError):
    pass


class NoSuchUser(StoreError):
    pass


class NoSuchGroup(StoreError):
    pass


class NotAMember(StoreError):
    pass


class NotFriends(StoreError):
    pass


class FriendOffline(StoreError):
    pass


class NotACommitter(StoreError):
    pass


_POST_ERRORS = {-1: NoSuchUser, -2: NoSuchGroup, -3: NotAMember, -4: NotFriends,
                -5: FriendOffline, -6: NotACommitter}


def _answer(call: Callable[[Any], object], value) -> None:
    """Give one post its answer; one that raises must not keep the others of its batch from
    theirs."""
    try:
        call(value)
    except Exception:
        log.failure("a stored message's handler failed")


class Script:
    """A Lua script run with EVALSHA.

    ``RedisStore.prepare`` loads every script before the store is used: a script that is
    missing (Redis restarted) is sent again with EVAL, but that reply comes later than the
    commands sent meanwhile, so it must stay the exception.
    """

    all: list["Script"] = []

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        Script.all.append(self)

    def __call__(self, redis, keys: list[str], args: list[Any]) -> defer.Deferred:
        d = redis.evalsha(self.sha, keys, args)

        def reload(failure):
            failure.trap(txredisapi.ScriptDoesNotExist)
            return redis.eval(self.source, keys, args)

        return d.addErrback(reload)


async def _load_scripts(redis) -> None:
    for script in Script.all:
        await redis.execute_command("SCRIPT", "LOAD", script.source)


_CREATE_USER = Script("""
local p = ARGV[1]
if redis.call('EXISTS', p..'acct:'..ARGV[8], p..'acct:'..ARGV[2]) > 0 then return 0 end
local id = redis.call('INCR', p..'nextid')
if id < tonumber(ARGV[6]) then
  redis.call('SET', p..'nextid', ARGV[6]); id = tonumber(ARGV[6])
end
redis.call('HSET', p..'u:'..id, 'account', ARGV[2], 'name', ARGV[3], 'verifier', ARGV[4],
           'avatar', ARGV[5], 'created', ARGV[7])
for i = 9, #ARGV, 2 do redis.call('HSET', p..'u:'..id, ARGV[i], ARGV[i + 1]) end
redis.call('SET', p..'acct:'..ARGV[8], id)
redis.call('SADD', p..'users', id)
redis.call('SADD', p..'name:'..ARGV[3], id)
local system = redis.call('GET', p..'system')
if system then
  redis.call('SADD', p..'gm:'..system, id)
  redis.call('SADD', p..'ug:'..id, system)
  redis.call('INCR', p..'gmv:'..system)
end
return id
""")

# Once, on data from before account names were folded: a folded acct: key for every user.
# Account names are ASCII (Accounts.create), so Lua's string.lower folds them as fold() does.
_FOLD_ACCOUNTS = Script("""
local p = ARGV[1]
if redis.call('EXISTS', p..'acctfold') == 1 then return 0 end
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', p..'users')) do
  local account = redis.call('HGET', p..'u:'..id, 'account')
  if account then n = n + redis.call('SETNX', p..'acct:'..string.lower(account), id) end
end
redis.call('SET', p..'acctfold', 1)
return n
""")


def fold(account: str) -> str:
    """The form of an account name that the account index is keyed by (ASCII lower case)."""
    return account.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")


_CREATE_GROUP = Script("""
local p = ARGV[1]
local id = redis.call('INCR', p..'nextid')
if id < tonumber(ARGV[6]) then
  redis.call('SET', p..'nextid', ARGV[6]); id = tonumber(ARGV[6])
end
redis.call('HSET', p..'g:'..id, 'creator', ARGV[2], 'name', ARGV[3], 'notice', '',
           'snap', ARGV[4], 'created', ARGV[5])
for i = 7, #ARGV do
  redis.call('SADD', p..'gm:'..id, ARGV[i])
  redis.call('SADD', p..'ug:'..ARGV[i], id)
end
return id
""")

# ARGV: prefix, SADD or SREM, group id, user ids.  Keeps gm: and ug: in step.
_MEMBERSHIP = Script("""
local p, op, gid = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV do
  redis.call(op, p..'gm:'..gid, ARGV[i])
  redis.call(op, p..'ug:'..ARGV[i], gid)
end
redis.call('INCR', p..'gmv:'..gid)
return 1
""")

# ARGV: prefix, node, history cap, queue cap, and a JSON array of 7 strings per message:
#       conversation, JSON tail (",sender,...]"), sender, type ('unicast' | 'group'), to,
#       mode ('f': only to a friend with a live session, else stored nowhere), xuanxuan chat
#       gid ('' none).
# For each message: checks the recipient (user exists; group exists and has the sender as a
# member) and, with a chat gid, that the chat's committers (if any) include the sender;
# appends to history, publishes to the other nodes of every recipient and of the sender (for
# the sender's other sessions), queues for recipients live nowhere; with a chat gid, stamps
# the chat's lastActiveTime and lists a one-to-one chat as both users' (xo:).
# Returns, per message, {id, ts, n, n uids live on the calling node} or {error code, 0, 0}:
# -1 no such user, -2 no such group, -3 sender not a member, -4 not friends, -5 the friend
# has no live session, -6 not one of the chat's committers.
_POST = Script("""
local p, node = ARGV[1], ARGV[2]
local hcap, qcap = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local ts = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local alive = {}
local function is_alive(n)
  if alive[n] == nil then alive[n] = redis.call('EXISTS', p..'alive:'..n) == 1 end
  return alive[n]
end
-- Nothing else runs during the script, so what it reads stays true for the whole batch
-- unless the script changes it itself (a dead node's SREM below).
local users, locs = {}, {}
local function is_user(uid)
  if users[uid] == nil then users[uid] = redis.call('SISMEMBER', p..'users', uid) == 1 end
  return users[uid]
end
local function where(uid)
  if locs[uid] == nil then locs[uid] = redis.call('SMEMBERS', p..'loc:'..uid) end
  return locs[uid]
end
local function unlocate(uid, n)
  redis.call('SREM', p..'loc:'..uid, n)
  locs[uid] = nil
end
local function live_anywhere(uid)
  for _, n in ipairs(where(uid)) do
    if n == node or is_alive(n) then return true end
  end
  return false
end
local rows = cjson.decode(ARGV[5])
-- One INCRBY for the batch: a refused message leaves a gap, ids only need to increase.
local nextid = redis.call('INCRBY', p..'msgid', #rows / 7) - #rows / 7
for m = 1, #rows, 7 do
  local conv, tail, sender, ctype, to = rows[m], rows[m+1], rows[m+2], rows[m+3], rows[m+4]
  local mode, chat = rows[m+5], rows[m+6]
  local targets, err
  if ctype == 'group' then
    if redis.call('EXISTS', p..'g:'..to) == 0 then err = -2
    elseif redis.call('SISMEMBER', p..'gm:'..to, sender) == 0 then err = -3
    else targets = redis.call('SMEMBERS', p..'gm:'..to) end
  elseif not is_user(to) then err = -1
  elseif mode == 'f' and redis.call('HEXISTS', p..'fr:'..sender, to) == 0 then err = -4
  elseif mode == 'f' and not live_anywhere(to) then err = -5
  else
    targets = {to}
    if to ~= sender then targets[2] = sender end
  end
  if not err and chat ~= '' then
    local committers = redis.call('HGET', p..'xc:'..chat, 'committers')
    if committers and committers ~= '' and
        not string.find(','..committers..',', ','..sender..',', 1, true) then err = -6 end
  end
  if err then
    out[#out + 1] = err; out[#out + 1] = 0; out[#out + 1] = 0
  else
    nextid = nextid + 1
    local id = nextid
    local msg = '['..id..','..ts..tail
    local hkey = p..'h:'..conv
    if redis.call('RPUSH', hkey, msg) > hcap then redis.call('LTRIM', hkey, -hcap, -1) end
    local bynode, live, here = {}, {}, {}
    for _, uid in ipairs(targets) do
      for _, n in ipairs(where(uid)) do
        if n == node then
          live[uid] = true
          here[#here + 1] = uid
        elseif is_alive(n) then
          bynode[n] = bynode[n] or {}
          table.insert(bynode[n], uid)
        else
          unlocate(uid, n)
        end
      end
    end
    for n, uids in pairs(bynode) do
      if redis.call('PUBLISH', p..'chan:'..n, table.concat(uids, ',')..'|'..msg) > 0 then
        for _, uid in ipairs(uids) do live[uid] = true end
      else
        for _, uid in ipairs(uids) do unlocate(uid, n) end
      end
    end
    for _, uid in ipairs(targets) do
      if not live[uid] and uid ~= sender then
        if redis.call('RPUSH', p..'q:'..uid, msg) > qcap then
          redis.call('LTRIM', p..'q:'..uid, -qcap, -1)
        end
      end
    end
    if chat ~= '' then
      redis.call('HSET', p..'xc:'..chat, 'lastActiveTime', math.floor(ts / 1000))
      if ctype ~= 'group' then
        redis.call('SADD', p..'xo:'..sender, chat)
        redis.call('SADD', p..'xo:'..to, chat)
      end
    end
    out[#out + 1] = id; out[#out + 1] = ts; out[#out + 1] = #here
    for _, uid in ipairs(here) do out[#out + 1] = tonumber(uid) end
  end
end
return out
""")

# ARGV: prefix, node, payload, '1' to also publish it on the presence channel, user ids.
# Publishes a notice to the other nodes that hold sessions of those users; returns nothing
# (notices are never queued).
_NOTIFY = Script("""
local p, node = ARGV[1], ARGV[2]
if ARGV[4] == '1' then redis.call('PUBLISH', p..'presence', node..'|'..ARGV[3]) end
local bynode = {}
for i = 5, #ARGV do
  for _, n in ipairs(redis.call('SMEMBERS', p..'loc:'..ARGV[i])) do
    if n ~= node then
      bynode[n] = bynode[n] or {}
      table.insert(bynode[n], ARGV[i])
    end
  end
end
for n, uids in pairs(bynode) do
  redis.call('PUBLISH', p..'chan:'..n, '!'..table.concat(uids, ',')..'|'..ARGV[3])
end
return 1
""")

# ARGV: prefix, first id, now.  The system group: every user is a member.
_SYSTEM_GROUP = Script("""
local p = ARGV[1]
local gid = redis.call('GET', p..'system')
if gid then return tonumber(gid) end
gid = redis.call('INCR', p..'nextid')
if gid < tonumber(ARGV[2]) then
  redis.call('SET', p..'nextid', ARGV[2]); gid = tonumber(ARGV[2])
end
redis.call('HSET', p..'g:'..gid, 'creator', 0, 'name', 'system', 'notice', '', 'snap', '',
           'created', ARGV[3])
for _, uid in ipairs(redis.call('SMEMBERS', p..'users')) do
  redis.call('SADD', p..'gm:'..gid, uid)
  redis.call('SADD', p..'ug:'..uid, gid)
end
redis.call('INCR', p..'gmv:'..gid)
redis.call('SET', p..'system', gid)
redis.call('SET', p..'xg:'..gid, 'system')
redis.call('HSET', p..'xc:system', 'type', 'system', 'group', gid)
return gid
""")

# ARGV: prefix, group id, the members' version (gmv:) and count the caller holds ('' none).
# Returns {fields (HGETALL), version, count} and, unless the caller's copy is current, the
# members.
_GROUP = Script("""
local p, gid = ARGV[1], ARGV[2]
local fields = redis.call('HGETALL', p..'g:'..gid)
local version = redis.call('GET', p..'gmv:'..gid) or '0'
local count = tostring(redis.call('SCARD', p..'gm:'..gid))
if version == ARGV[3] and count == ARGV[4] then return {fields, version, count} end
return {fields, version, count, redis.call('SMEMBERS', p..'gm:'..gid)}
""")

# ARGV: prefix, user ids.  Returns those with a session on a living node.
_ONLINE = Script("""
local p, alive, out = ARGV[1], {}, {}
for i = 2, #ARGV do
  for _, n in ipairs(redis.call('SMEMBERS', p..'loc:'..ARGV[i])) do
    if alive[n] == nil then alive[n] = redis.call('EXISTS', p..'alive:'..n) == 1 end
    if alive[n] then out[#out + 1] = tonumber(ARGV[i]); break end
  end
end
return out
""")

# ARGV: prefix, user id, new display name.  Keeps the name index in step.
_RENAME = Script("""
local p, uid, name = ARGV[1], ARGV[2], ARGV[3]
local old = redis.call('HGET', p..'u:'..uid, 'name')
if old then redis.call('SREM', p..'name:'..old, uid) end
redis.call('HSET', p..'u:'..uid, 'name', name)
redis.call('SADD', p..'name:'..name, uid)
return 1
""")

# ARGV: prefix, a, b, a's alias for b, b's alias for a.  Friends both ways; pending
# requests between the two are gone.
_BEFRIEND = Script("""
local p, a, b = ARGV[1], ARGV[2], ARGV[3]
redis.call('HSET', p..'fr:'..a, b, ARGV[4])
redis.call('HSET', p..'fr:'..b, a, ARGV[5])
redis.call('HDEL', p..'frq:'..a, b)
redis.call('HDEL', p..'frq:'..b, a)
return 1
""")

# ARGV: prefix, a, b.  Returns 1 when they were friends (now removed both ways).
_UNFRIEND = Script("""
local p, a, b = ARGV[1], ARGV[2], ARGV[3]
local was = redis.call('HDEL', p..'fr:'..a, b)
redis.call('HDEL', p..'fr:'..b, a)
return was
""")

# ARGV: prefix, node, uid.  Marks the user live on the node and drains the queue.
# Returns {1 if the user was already live on a living node else 0, queued messages...}.
_ATTACH = Script("""
local p = ARGV[1]
local loc = p..'loc:'..ARGV[3]
local was = 0
for _, n in ipairs(redis.call('SMEMBERS', loc)) do
  if redis.call('EXISTS', p..'alive:'..n) == 1 then was = 1 end
end
redis.call('SADD', loc, ARGV[2])
redis.call('SADD', p..'nu:'..ARGV[2], ARGV[3])
local q = p..'q:'..ARGV[3]
local msgs = redis.call('LRANGE', q, 0, -1)
redis.call('DEL', q)
table.insert(msgs, 1, was)
return msgs
""")

# ARGV: prefix, node, uid.  The user's last session on the node ended.
_DETACH = Script("""
redis.call('SREM', ARGV[1]..'loc:'..ARGV[3], ARGV[2])
redis.call('SREM', ARGV[1]..'nu:'..ARGV[2], ARGV[3])
return 1
""")

# ARGV: prefix, calling node, batch size, node to clean up ('' for every dead node).
# Takes (SPOP, so each user is claimed by exactly one caller) up to a batch of the users of
# a stopped or dead node (alive key gone), forgets that they were live there, and returns
# {1 if more remain else 0, the ids of those now live on no living node...}.  A node is
# dropped from 'nodes' once all its users are taken.
_REAP = Script("""
local p, me, room, only = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local gone, more = {}, 0
local candidates = redis.call('SMEMBERS', p..'nodes')
if only ~= '' then candidates = {only} end
for _, n in ipairs(candidates) do
  if (n == only or n ~= me) and redis.call('EXISTS', p..'alive:'..n) == 0 then
    local key = p..'nu:'..n
    local uids = {}
    if room > 0 then uids = redis.call('SPOP', key, room) end
    room = room - #uids
    for _, uid in ipairs(uids) do
      redis.call('SREM', p..'loc:'..uid, n)
      local live = false
      for _, m in ipairs(redis.call('SMEMBERS', p..'loc:'..uid)) do
        if redis.call('EXISTS', p..'alive:'..m) == 1 then live = true; break end
      end
      if not live then gone[#gone + 1] = tonumber(uid) end
    end
    if redis.call('EXISTS', key) == 0 then redis.call('SREM', p..'nodes', n) else more = 1 end
  end
end
table.insert(gone, 1, more)
return gone
""")

# ARGV: prefix, then per chat: one-to-one chat gid, its two users, the user who is shown
# it.  Lists each chat as both users' and returns, per chat, that user's flags JSON (or '')
# and the chat's settings (HGETALL).
_CONTACT = Script("""
local p, out = ARGV[1], {}
for i = 2, #ARGV, 4 do
  local gid = ARGV[i]
  redis.call('SADD', p..'xo:'..ARGV[i + 1], gid)
  redis.call('SADD', p..'xo:'..ARGV[i + 2], gid)
  out[#out + 1] = redis.call('HGET', p..'xu:'..ARGV[i + 3], gid) or ''
  out[#out + 1] = redis.call('HGETALL', p..'xc:'..gid)
end
return out
""")

# Puts messages back in a queue (a delivery that found no session any more).
_REQUEUE = Script("""
for i = 3, #ARGV do redis.call('RPUSH', ARGV[1]..'q:'..ARGV[2], ARGV[i]) end
return 1
""")


_USER_FIELDS = ("account", "name", "avatar", *PROFILE_FIELDS)


def _pairs(row) -> dict:
    """An HGETALL reply as a dict (a pipeline gives the flat list)."""
    if isinstance(row, dict):
        return row
    return dict(zip(row[::2], row[1::2]))


def _user(uid: int, fields: dict) -> User | None:
    if not fields:
        return None
    return User(id=int(uid), **{k: fields.get(k) or "" for k in _USER_FIELDS})


class RedisStore:
    """Persistence for users, tokens, groups, history, offline queues and presence."""

    def __init__(self, redis, history_limit: int = 1000, queue_limit: int = 10000,
                 prefix: str = PREFIX, clock=None):
        from twisted.internet import reactor

        self._clock = clock or reactor
        self._batch: list[tuple[Message, Callable, Callable, str, str]] = []
        self._batch_node = ""
        self.redis = redis
        self.history_limit = history_limit
        self.queue_limit = queue_limit
        self.p = prefix
        # gid: (version, count, members) of the big groups read (see gmv: and get_group)
        self._members: dict[int, tuple[str, str, tuple[int, ...]]] = {}
        self._system: int | None = None  # the system group's id, once known

    async def prepare(self) -> None:
        """Load the Lua scripts, now and on every reconnection (Redis may have restarted
        and lost them) before the connection is used."""
        await _load_scripts(self.redis)
        self.redis.before_use(_load_scripts)
        await self.drop_clear_tokens()
        await _FOLD_ACCOUNTS(self.redis, [], [self.p])

    # -- users -------------------------------------------------------------------------

    async def create_user(self, account: str, name: str, verifier: str,
                          avatar: str = "", **profile: str) -> User:
        """A new user; ``profile`` takes the fields of PROFILE_FIELDS."""
        extra = [x for k in PROFILE_FIELDS for x in (k, profile.get(k) or "")]
        uid = await _CREATE_USER(self.redis, [], [
            self.p, account, name, verifier, avatar, FIRST_ID, int(time.time()), fold(account),
            *extra])
        if not uid:
            raise AccountTaken(account)
        return User(id=int(uid), account=account, name=name, avatar=avatar,
                    **{k: profile.get(k) or "" for k in PROFILE_FIELDS})

    async def get_user(self, uid: int) -> User | None:
        return _user(uid, await self.redis.hgetall(f"{self.p}u:{int(uid)}"))

    async def get_users(self, uids: Iterable[int]) -> dict[int, User]:
        """Several users in one round trip; unknown ids are left out."""
        uids = [int(u) for u in uids]
        if not uids:
            return {}
        rows = await self._pipeline([("HMGET", f"{self.p}u:{u}", *_USER_FIELDS)
                                     for u in uids])
        found = {}
        for uid, row in zip(uids, rows):
            if row and row[0] is not None:
                found[uid] = _user(uid, dict(zip(_USER_FIELDS, row)))
        return found

    async def find_by_name(self, name: str) -> list[User]:
        ids = sorted(int(u) for u in await self.redis.smembers(f"{self.p}name:{name}"))
        users = await self.get_users(ids)
        return [users[u] for u in ids if u in users]

    async def rename_user(self, uid: int, name: str) -> None:
        await _RENAME(self.redis, [], [self.p, int(uid), name])

    async def set_user_fields(self, uid: int, **fields: str) -> None:
        """Per-user settings kept beside the profile (webim show, status, setting).  A new
        verifier or disabled flag also forgets the user's remembered logins."""
        if not fields:
            return
        key = f"{self.p}u:{int(uid)}"
        if "verifier" in fields or "disabled" in fields:
            await self._pipeline([("HSET", key, *[x for kv in fields.items() for x in kv]),
                                  ("DEL", f"{self.p}vl:{int(uid)}")])
        else:
            await self.redis.hmset(key, fields)

    async def login_fields(self, uid: int, node_key: str) -> tuple[str, bool, str]:
        """(verifier, disabled, the login this node key remembers for the user or "") in one
        round trip."""
        (verifier, disabled), remembered = await self._pipeline([
            ("HMGET", f"{self.p}u:{int(uid)}", "verifier", "disabled"),
            ("HGET", f"{self.p}vl:{int(uid)}", node_key)])
        return verifier or "", disabled == "1", remembered or ""

    async def remember_login(self, uid: int, node_key: str, mac: str, ttl: int) -> None:
        """Keep ``mac`` (a keyed hash of a verified login) for ``ttl`` seconds."""
        key = f"{self.p}vl:{int(uid)}"
        await self._pipeline([("HSET", key, node_key, mac), ("EXPIRE", key, int(ttl))])

    async def user_fields(self, uid: int, *names: str) -> dict[str, str]:
        values = await self.redis.hmget(f"{self.p}u:{int(uid)}", list(names))
        return {n: v or "" for n, v in zip(names, values)}

    async def users_fields(self, uids: list[int], *names: str) -> dict[int, dict[str, str]]:
        """user_fields for several users in one round trip."""
        rows = await self._pipeline([("HMGET", f"{self.p}u:{int(u)}", *names) for u in uids])
        return {int(u): {n: v or "" for n, v in zip(names, row or [])}
                for u, row in zip(uids, rows)}

    async def find_account(self, account: str) -> int | None:
        """The user id of an account name in any case (the name as created first: data from
        before folding may hold two names that differ only in case)."""
        exact, folded = await self.redis.mget([f"{self.p}acct:{account}",
                                              f"{self.p}acct:{fold(account)}"])
        uid = exact or folded
        return int(uid) if uid else None

    async def get_verifier(self, uid: int) -> str | None:
        return await self.redis.hget(f"{self.p}u:{int(uid)}", "verifier")

    async def user_ids(self) -> list[int]:
        return sorted(int(u) for u in await self.redis.smembers(f"{self.p}users"))

    async def list_users(self) -> list[User]:
        ids = await self.user_ids()
        users = await self.get_users(ids)
        return [users[u] for u in ids if u in users]

    async def users_exist(self, uids: Iterable[int]) -> list[int]:
        """The ids among ``uids`` that are not users."""
        uids = [int(u) for u in uids]
        if not uids:
            return []
        flags = await self._pipeline([("SISMEMBER", f"{self.p}users", u) for u in uids])
        return [u for u, f in zip(uids, flags) if not int(f)]

    # -- tokens ------------------------------------------------------------------------

    def _token_key(self, token: str) -> str:
        # A token is 128 random bits: a plain SHA-256 is enough (nothing to brute-force).
        return f"{self.p}th:{hashlib.sha256(token.encode('utf-8', 'replace')).hexdigest()}"

    async def issue_token(self, uid: int, ttl: int) -> str:
        token = secrets.token_hex(16)
        await self.redis.set(self._token_key(token), int(uid), expire=int(ttl))
        return token

    async def check_token(self, token: str) -> int | None:
        if not token or len(token) > 128:
            return None
        uid = await self.redis.get(self._token_key(token))
        return int(uid) if uid else None

    async def revoke_token(self, token: str) -> None:
        if token and len(token) <= 128:
            await self.redis.delete(self._token_key(token))

    async def drop_clear_tokens(self) -> None:
        """Delete the tokens an older imd stored in clear (``tok:<token>``), once per data
        set: they are not honoured any more, and must not stay readable on disk."""
        if await self.redis.get(f"{self.p}tokens") == "hashed":
            return
        cursor, deleted = 0, 0
        while True:
            cursor, keys = await self.redis.scan(cursor, f"{self.p}tok:*", 1000)
            if keys:
                deleted += await self.redis.delete(keys)
            if int(cursor) == 0:
                break
        await self.redis.set(f"{self.p}tokens", "hashed")
        if deleted:
            # The append-only file still holds the SET commands until it is rewritten.
            info = await self.redis.info("persistence")
            if str(info.get("aof_enabled")) == "1":
                await self.redis.bgrewriteaof()

    # -- groups ------------------------------------------------------------------------

    async def create_group(self, creator: int, name: str, members: Iterable[int],
                           snap: str = "") -> Group:
        members = sorted({int(creator), *(int(m) for m in members)})
        gid = await _CREATE_GROUP(self.redis, [], [
            self.p, int(creator), name, snap, int(time.time()), FIRST_ID, *members])
        return Group(id=int(gid), creator=int(creator), name=name, snap=snap,
                     members=tuple(members))

    async def get_group(self, gid: int) -> Group | None:
        """The group (its members sorted).  The members of a big group (the system chat's:
        every user) are kept and sent again only when their version moved: a login does not
        read and convert 10,000 ids for it."""
        gid = int(gid)
        known = self._members.get(gid)
        row = await _GROUP(self.redis, [], [self.p, gid, *(known[:2] if known else ("", ""))])
        fields, version, count = row[:3]
        if len(row) > 3:
            members = tuple(sorted(int(m) for m in row[3]))
            kept = self._members.get(gid)  # by a read that ran at the same time
            if kept is not None and kept[:2] == (version, count) and kept[2] == members:
                members = kept[2]  # one tuple while it is current
            elif len(members) >= BIG_GROUP:
                self._members[gid] = (version, count, members)
            else:
                self._members.pop(gid, None)
        else:
            members = known[2]
        if not fields:
            return None
        fields = _pairs(fields)
        return Group(id=int(gid), creator=int(fields["creator"]), name=fields.get("name", ""),
                     notice=fields.get("notice", ""), snap=fields.get("snap", ""),
                     members=members, public=fields.get("public") == "1")

    async def group_members(self, gid: int) -> list[int]:
        return sorted(int(m) for m in await self.redis.smembers(f"{self.p}gm:{int(gid)}"))

    async def add_members(self, gid: int, uids: Iterable[int]) -> None:
        await _MEMBERSHIP(self.redis, [], [self.p, "SADD", int(gid), *map(int, uids)])

    async def remove_members(self, gid: int, uids: Iterable[int]) -> None:
        await _MEMBERSHIP(self.redis, [], [self.p, "SREM", int(gid), *map(int, uids)])

    async def edit_group(self, gid: int, **fields: str) -> None:
        if fields:
            await self.redis.hmset(f"{self.p}g:{int(gid)}", fields)

    async def set_public(self, gid: int, public: bool) -> None:
        await self._pipeline([
            ("HSET", f"{self.p}g:{int(gid)}", "public", "1" if public else "0"),
            ("SADD" if public else "SREM", f"{self.p}public", int(gid))])

    async def public_groups(self) -> list[int]:
        return sorted(int(g) for g in await self.redis.smembers(f"{self.p}public"))

    async def user_groups(self, uid: int) -> list[int]:
        """The user's groups, without the system group: every user is in that one, and
        only xuanxuan shows it (as its system chat), not as a room or a 66boss group."""
        groups, system = await self._pipeline([("SMEMBERS", f"{self.p}ug:{int(uid)}"),
                                               ("GET", f"{self.p}system")])
        return sorted(int(g) for g in groups if g != system)

    # -- friends -----------------------------------------------------------------------

    async def friends(self, uid: int) -> dict[int, str]:
        """The user's friends: id -> the alias the user gave them."""
        return {int(k): v for k, v in (await self.redis.hgetall(f"{self.p}fr:{int(uid)}")).items()}

    async def are_friends(self, a: int, b: int) -> bool:
        return bool(await self.redis.hexists(f"{self.p}fr:{int(a)}", int(b)))

    async def add_friend_request(self, frm: int, to: int, name: str, note: str) -> None:
        await self.redis.hset(f"{self.p}frq:{int(to)}", int(frm),
                              json.dumps({"name": name, "note": note}, ensure_ascii=False))

    async def friend_requests(self, uid: int) -> dict[int, dict]:
        """Pending requests to the user: requester id -> {name, note}."""
        raw = await self.redis.hgetall(f"{self.p}frq:{int(uid)}")
        return {int(k): json.loads(v) for k, v in raw.items()}

    async def befriend(self, a: int, b: int, alias_of_b: str, alias_of_a: str) -> None:
        await _BEFRIEND(self.redis, [], [self.p, int(a), int(b), alias_of_b, alias_of_a])

    async def unfriend(self, a: int, b: int) -> bool:
        return bool(int(await _UNFRIEND(self.redis, [], [self.p, int(a), int(b)])))

    # -- xuanxuan chat settings ---------------------------------------------------------

    async def chat_meta(self, gid: str) -> dict[str, str]:
        return await self.redis.hgetall(f"{self.p}xc:{gid}")

    async def set_chat_meta(self, gid: str, **fields) -> None:
        await self.redis.hmset(f"{self.p}xc:{gid}", {k: str(v) for k, v in fields.items()})

    async def group_for_gid(self, gid: str) -> int | None:
        meta = await self.redis.hget(f"{self.p}xc:{gid}", "group")
        return int(meta) if meta else None

    async def gid_for_group(self, group_id: int) -> str | None:
        return await self.redis.get(f"{self.p}xg:{int(group_id)}")

    async def link_gid(self, gid: str, group_id: int) -> None:
        await self.redis.set(f"{self.p}xg:{int(group_id)}", gid)
        await self.redis.hset(f"{self.p}xc:{gid}", "group", int(group_id))

    async def chat_flags(self, uid: int) -> dict[str, dict]:
        raw = await self.redis.hgetall(f"{self.p}xu:{int(uid)}")
        return {gid: json.loads(v) for gid, v in raw.items()}

    async def set_chat_flag(self, uid: int, gid: str, name: str, value: bool) -> None:
        flags = (await self.chat_flags(uid)).get(gid, {})
        flags[name] = bool(value)
        await self.redis.hset(f"{self.p}xu:{int(uid)}", gid, json.dumps(flags))

    async def one2one_chats(self, uid: int) -> list[str]:
        return sorted(await self.redis.smembers(f"{self.p}xo:{int(uid)}"))

    async def add_one2one(self, gid: str, a: int, b: int) -> None:
        await self._pipeline([("SADD", f"{self.p}xo:{int(a)}", gid),
                              ("SADD", f"{self.p}xo:{int(b)}", gid)])

    async def one2one_contact(self, gid: str, a: int, b: int,
                              viewer: int) -> tuple[dict[str, str], dict]:
        """Lists a one-to-one chat as both users' and returns its settings and
        ``viewer``'s flags for it (one round trip)."""
        return (await self.one2one_contacts([(gid, a, b, viewer)]))[0]

    def one2one_contacts(self, contacts: list[tuple[str, int, int, int]]) -> defer.Deferred:
        """``one2one_contact`` of each (gid, a, b, viewer), in one round trip:
        Deferred[list[(settings, flags)]]."""
        args: list[Any] = [self.p]
        for gid, a, b, viewer in contacts:
            args += [gid, int(a), int(b), int(viewer)]
        return _CONTACT(self.redis, [], args).addCallback(lambda out: [
            (_pairs(meta), json.loads(flags) if flags else {})
            for flags, meta in zip(out[::2], out[1::2])])

    async def add_file(self, gid: str, title: str, size: int, added_by: int,
                       name: str) -> int:
        fid = int(await self.redis.incr(f"{self.p}fileid"))
        await self._pipeline([
            ("HSET", f"{self.p}xfile:{fid}", "gid", gid, "title", title, "size", size,
             "addedBy", added_by, "date", int(time.time()), "name", name),
            ("RPUSH", f"{self.p}xfiles:{gid}", fid)])
        return fid

    async def get_file(self, fid: int) -> dict | None:
        fields = await self.redis.hgetall(f"{self.p}xfile:{int(fid)}")
        return {**fields, "id": int(fid), "size": int(fields["size"]),
                "addedBy": int(fields["addedBy"])} if fields else None

    async def chat_files(self, gid: str) -> list[dict]:
        ids = await self.redis.lrange(f"{self.p}xfiles:{gid}", 0, -1)
        files = [await self.get_file(int(i)) for i in ids]
        return [f for f in files if f]

    async def system_group(self) -> int:
        """The group every user is in (xuanxuan's system chat), made on first use (its id
        never changes once made: asked once per node)."""
        if self._system is None:
            self._system = int(await _SYSTEM_GROUP(self.redis, [],
                                                   [self.p, FIRST_ID, int(time.time())]))
        return self._system

    # -- notices -----------------------------------------------------------------------

    async def notify(self, node: str, uids: Iterable[int], event: Event,
                     everyone: bool = False) -> None:
        """Send a notice to the sessions of ``uids`` on other nodes (never stored);
        ``everyone``: also publish it on the presence channel, which every node hears."""
        uids = [int(u) for u in uids]
        if uids or everyone:
            await _NOTIFY(self.redis, [], [self.p, node, event.to_json(),
                                           "1" if everyone else "0", *uids])

    async def presence_of(self, uid: int) -> tuple[User | None, str, str, list[int]]:
        """What a presence notice about ``uid`` says and whom it goes to, in one round trip:
        the user, their show and status text, and their friends' ids."""
        row, friends = await self._pipeline([
            ("HMGET", f"{self.p}u:{int(uid)}", *_USER_FIELDS, "show", "status"),
            ("HKEYS", f"{self.p}fr:{int(uid)}")])
        if not row or row[0] is None:
            return None, "", "", []
        *fields, show, status = row
        return (_user(uid, dict(zip(_USER_FIELDS, fields))), show or "", status or "",
                [int(f) for f in friends or ()])

    # -- messages ----------------------------------------------------------------------

    def post(self, message: Message, node: str, friends_only: bool = False,
             chat: str = "") -> defer.Deferred:
        """Check, store and route ``message``; fills in ``id`` and ``ts``.

        Deferred[list[int]]: the recipients (and the sender) with a live session on
        ``node``, which the caller delivers to itself.  Fails with NoSuchUser, NoSuchGroup,
        NotAMember (NotFriends, FriendOffline with ``friends_only``) or NotACommitter.
        ``chat``: the xuanxuan chat (``xc:`` gid) the message is posted in: its committers
        are checked, its lastActiveTime stamped and a one-to-one chat listed as both users'
        in the same script call.  The messages posted during one reactor turn go to Redis as
        one script call, in order.
        """
        d = defer.Deferred()
        self.post_then(message, node, d.callback, d.errback, friends_only, chat)
        return d

    def post_then(self, message: Message, node: str, stored: Callable[[list[int]], object],
                  failed: Callable[[Failure], object], friends_only: bool = False,
                  chat: str = "") -> None:
        """``post`` for the hot path: ``stored(recipients here)`` or ``failed(Failure)`` is
        called once the batch's answer is in, instead of firing a Deferred (a Deferred per
        message, with the hub's and the adapter's callbacks, cost a tenth of the daemon's
        time at full speed).  An exception in either is logged; the batch goes on."""
        self._batch_node = node
        self._batch.append((message, stored, failed, "f" if friends_only else "", chat))
        if len(self._batch) == 1:
            self._clock.callLater(0, self._flush)
        elif len(self._batch) >= MAX_BATCH:
            self._flush()

    def _flush(self) -> None:
        """Send the pending posts.  Also called before reads that must see them, since
        commands on the one connection run in the order they are sent."""
        batch, self._batch = self._batch, []
        if not batch:
            return
        rows: list[str] = []
        good = []
        for message, stored, failed, mode, chat in batch:
            try:
                tail = message.to_json()
                tail = tail[tail.index(",", tail.index(",") + 1):]  # drop the "[id,ts" head
                rows += [message.conversation, tail, str(int(message.sender)), message.ctype,
                         str(int(message.to)), mode, chat]
            except Exception:  # one bad message must not sink the batch
                _answer(failed, Failure())
            else:
                good.append((message, stored, failed))
        batch = good
        if not batch:
            return
        # The batch goes as one JSON argument: encoding a few hundred small arguments one by
        # one cost the daemon more than the script's run costs Redis.
        args = [self.p, self._batch_node, self.history_limit, self.queue_limit,
                compact_json(rows)]
        # A send waits out a Redis outage (the patient handle) rather than fail.
        _POST(self.redis.patient, [], args).addCallbacks(
            self._posted, self._post_failed, callbackArgs=(batch,), errbackArgs=(batch,))

    @staticmethod
    def _posted(result: list, batch: list) -> None:
        i = 0
        for message, stored, failed in batch:
            code, ts, n = int(result[i]), int(result[i + 1]), int(result[i + 2])
            here = result[i + 3:i + 3 + n]
            i += 3 + n
            if code < 0:
                _answer(failed, Failure(_POST_ERRORS[code](message.to)))
            else:
                message.id, message.ts = code, ts
                _answer(stored, [int(u) for u in here])

    @staticmethod
    def _post_failed(failure, batch: list) -> None:
        for _, _, failed in batch:
            _answer(failed, failure)

    async def history(self, conversation: str, since_ms: int = 0,
                      limit: int = 100) -> list[Message]:
        """The newest ``limit`` messages of a conversation at or after ``since_ms``, oldest
        first."""
        self._flush()
        raw = await self.redis.lrange(f"{self.p}h:{conversation}", -self.history_limit, -1)
        msgs = [Message.from_json(r) for r in raw]
        msgs = [m for m in msgs if m.ts >= since_ms]
        return msgs[-limit:] if limit else msgs

    async def clear_history(self, uid: int, conversation: str) -> None:
        """Hide a conversation's history so far from one user (the others keep theirs)."""
        self._flush()
        last = await self.redis.get(f"{self.p}msgid")
        await self.redis.hset(f"{self.p}hc:{int(uid)}", conversation, int(last or 0))

    async def history_cleared(self, uid: int, conversation: str) -> int:
        """The id of the last message the user cleared from the conversation (0: none)."""
        return int(await self.redis.hget(f"{self.p}hc:{int(uid)}", conversation) or 0)

    async def attach(self, uid: int, node: str) -> tuple[bool, list[Message]]:
        """Mark ``uid`` live on ``node`` and take its offline queue, atomically.

        Returns whether the user was already live somewhere, and the queued messages, sorted
        by id (a requeued message may have been appended after newer ones).
        """
        self._flush()
        was, *raw = await _ATTACH(self.redis, [], [self.p, node, int(uid)])
        return bool(int(was)), sorted((Message.from_json(r) for r in raw),
                                      key=lambda m: m.id)

    async def detach(self, uid: int, node: str) -> None:
        await _DETACH(self.redis, [], [self.p, node, int(uid)])

    async def requeue(self, uid: int, messages: list[Message]) -> None:
        if messages:
            await _REQUEUE(self.redis, [], [self.p, int(uid), *(m.to_json() for m in messages)])

    async def is_online(self, uid: int) -> bool:
        return int(uid) in await self.online_among([uid])

    async def online_among(self, uids: Iterable[int]) -> set[int]:
        """The users among ``uids`` with a live session on a living node (one round trip)."""
        uids = [int(u) for u in uids]
        if not uids:
            return set()
        live = await _ONLINE(self.redis, [], [self.p, *uids])
        return {int(u) for u in live}

    # -- nodes -------------------------------------------------------------------------

    def channel(self, node: str) -> str:
        return f"{self.p}chan:{node}"

    def presence_channel(self) -> str:
        """The channel every node subscribes to (presence for sessions watching everyone)."""
        return f"{self.p}presence"

    async def node_alive(self, node: str, ttl_ms: int) -> bool:
        """Refresh the node's liveness; False when it had lapsed (or never existed), so
        that other nodes may have taken its users for dead."""
        was, _, _ = await self._pipeline([
            ("EXISTS", f"{self.p}alive:{node}"),
            ("SET", f"{self.p}alive:{node}", "1", "PX", int(ttl_ms)),
            ("SADD", f"{self.p}nodes", node)])
        return bool(int(was))

    async def node_gone(self, node: str) -> list[int]:
        """A node stops: it is no longer alive and its users no longer live on it.
        Returns those of its users now live nowhere."""
        await self.redis.delete(f"{self.p}alive:{node}")
        return await self.reap(node, node)

    async def reap(self, me: str, only: str = "", batch: int = 500) -> list[int]:
        """Clean up after stopped or dead nodes (all of them, or just ``only``); returns the
        users who were live on them and are now live nowhere.  Each such user is returned
        to exactly one caller, however many nodes reap at once."""
        gone: list[int] = []
        while True:
            more, *uids = await _REAP(self.redis, [], [self.p, me, batch, only])
            gone += [int(u) for u in uids]
            if not int(more):
                return gone

    # -- operations (admin endpoint and imdctl) -----------------------------------------

    async def ping(self) -> float:
        """Time one PING (seconds), observed in REDIS_RTT."""
        start = time.monotonic()
        await self.redis.ping()
        rtt = time.monotonic() - start
        REDIS_RTT.observe(rtt)
        return rtt

    async def queue_depth(self, sample: int = 200) -> int:
        """Messages waiting in offline queues: exact up to ``sample`` users, else the
        mean queue of ``sample`` random users times the number of users (two round trips,
        whatever the number of users)."""
        total, uids = await self._pipeline([("SCARD", f"{self.p}users"),
                                            ("SRANDMEMBER", f"{self.p}users", sample)])
        if not uids:
            return 0
        lengths = await self._pipeline([("LLEN", f"{self.p}q:{u}") for u in uids])
        return round(sum(int(n) for n in lengths) * int(total) / len(uids))

    async def set_node_sessions(self, node: str, counts: dict[str, int], ttl_ms: int) -> None:
        key = f"{self.p}ns:{node}"
        commands: list[tuple] = [("DEL", key)]
        if counts:
            commands += [("HSET", key, *(x for kv in counts.items() for x in kv)),
                         ("PEXPIRE", key, int(ttl_ms))]
        await self._pipeline(commands)

    async def node_sessions(self) -> dict[str, dict[str, int]]:
        """Node id -> protocol -> sessions, for every node that reported lately."""
        nodes = sorted(await self.redis.smembers(f"{self.p}nodes"))
        if not nodes:
            return {}
        rows = await self._pipeline([("HGETALL", f"{self.p}ns:{n}") for n in nodes]
                                    + [("EXISTS", f"{self.p}alive:{n}") for n in nodes])
        counts, alive = rows[:len(nodes)], rows[len(nodes):]
        return {n: {k: int(v) for k, v in _pairs(c).items()}
                for n, c, a in zip(nodes, counts, alive) if int(a)}

    async def group_ids(self) -> list[int]:
        """Every group's id (a SCAN of the group hashes: for administrators, not for
        clients)."""
        ids, cursor = set(), "0"
        while True:
            (cursor, keys), = await self._pipeline([
                ("SCAN", cursor, "MATCH", f"{self.p}g:*", "COUNT", 1000)])
            ids.update(int(k[len(self.p) + 2:]) for k in keys)
            if str(cursor) == "0":
                return sorted(ids)

    async def is_disabled(self, uid: int) -> bool:
        return await self.redis.hget(f"{self.p}u:{int(uid)}", "disabled") == "1"

    async def add_admin_token(self, digest: str) -> None:
        await self.redis.sadd(f"{self.p}admintok", digest)

    async def is_admin_token(self, digest: str) -> bool:
        return bool(await self.redis.sismember(f"{self.p}admintok", digest))

    async def system_user(self) -> int | None:
        uid = await self.redis.get(f"{self.p}sysuser")
        return int(uid) if uid is not None else None

    async def set_system_user(self, uid: int) -> None:
        await self.redis.set(f"{self.p}sysuser", int(uid))

    # -- plumbing ----------------------------------------------------------------------

    async def _pipeline(self, commands: list[tuple]) -> list:
        """Run several commands in one round trip (pipelined on one connection)."""
        return await self.redis.pipeline(commands)
